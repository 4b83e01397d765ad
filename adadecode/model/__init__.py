"""The model in: a Llama checkpoint read into a config, weights and a tokenizer (the bottom layer: it imports no
other part of adadecode).

    config       LlamaConfig, from an HF config.json or a GGUF header; unsupported architectures refused here
    weights      LlamaWeights: the tensors under short names, and the map from HF checkpoint names
    tokenizer    Tokenizer: tokenizer.json, BOS/EOS and the chat template
    gguf_loader  a llama GGUF file: config, weights dequantised to bf16, tokenizer
    loader       load_model: an HF directory, a GGUF file or `default` -> Model
"""
