"""Model families as plug-ins: `registry` maps names to them, `base` is the contract, one folder per family."""
