"""The Ray Serve application: typed config, OpenAI ingress, DP rank group and the rank actors (docs/design.md)."""
