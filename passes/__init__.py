"""Graph passes of sparsify: capture, find linears, couple, plan, rewrite.

Installed as ``sparsify.passes``; each pass is a small module named after what it does.
"""
