"""Compiler passes: one pass per module, its verifier beside it. Imported as pipecc.passes."""
