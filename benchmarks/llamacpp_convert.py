"""Run llama.cpp's ``convert_hf_to_gguf.py`` on a GPT-2 directory with a locally trained tokenizer.

Runs inside the converter venv (``llamacpp_build.converter_python``), never in this project's:

    convert-venv/bin/python llamacpp_convert.py LLAMA_CPP_DIR HF_DIR --outtype f16 --outfile X.gguf

Why a launcher: the converter names a BPE pre-tokenizer by hashing the token ids of a fixed text
and knows only the hashes of published models, so any freshly trained vocabulary is refused
("BPE pre-tokenizer was not recognized"), even one split exactly like GPT-2. When the refused
tokenizer's ``tokenizer.json`` declares GPT-2's pre-tokenizer (ByteLevel with its regex, no
prefix space), this launcher answers ``"gpt-2"``, the name llama.cpp gives that split; any other
tokenizer is still refused. Nothing else of the converter changes.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def is_gpt2_split(pre: dict | None) -> bool:
    """GPT-2's pre-tokenizer: ByteLevel(add_prefix_space=False, use_regex=True), alone or as
    the only member of a Sequence."""
    if pre and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return bool(pre) and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", False) \
        and pre.get("use_regex", True)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    llama_dir, hf_dir, rest = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    from conversion import base  # the converter's own package, from the vendored tree

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            spec = json.loads((Path(self.dir_model) / "tokenizer.json").read_text())
            if not is_gpt2_split(spec.get("pre_tokenizer")):
                raise
            print("llamacpp_convert: unrecognised vocabulary with GPT-2's pre-tokenizer: "
                  "tokenizer.ggml.pre = 'gpt-2'", file=sys.stderr)
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), str(hf_dir), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
