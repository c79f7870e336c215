"""The core every op family builds on: backend choice, argument checks, the op definition,
config lookup. It imports no family."""
