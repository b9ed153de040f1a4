"""HTTP routes, one module per API family (TGI, classification, OpenAI, operations)."""
