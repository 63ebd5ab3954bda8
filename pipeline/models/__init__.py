"""Models: which timm architectures are supported, where their features live, and how their weights load."""
