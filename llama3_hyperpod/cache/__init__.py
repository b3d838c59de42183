"""The compiled-graph cache: one notion, two layouts (Neuron `neuronxcc-*/MODULE_*`, Inductor's directory).

manifest: what a cache was compiled for; inspect: what is in it; verify: will a plan hit it;
seed: a writable run-time copy of the read-only baked cache; prune: drop old compiler versions.
Nothing here imports torch.
"""
