"""FX passes: find the language model's attention subgraphs and rewrite them to CSP ops."""
