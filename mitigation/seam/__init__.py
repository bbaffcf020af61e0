"""The seam: Lucid's one way into transformers' attention.

`attention` (the "lucid" attention + mask functions transformers calls), `context` (the per-request state
in a ContextVar), `plan` (static edits), `hooks` (request state acting inside a forward), `recorder` (what
is kept of attention and hidden states), `request` (a list of methods composed for one generate call).
Imports only `lucid_kernels` and `lucid.errors`; never the model (`vlm`) or the methods.
"""
