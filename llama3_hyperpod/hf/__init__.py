"""Hugging Face checkpoint folders: safetensors I/O, the folder itself (config, index, tokenizer files, manifest), the
tensors a Llama of a given config must have, and the conversion steps the neuron plans run with the SDK's python."""
