"""Intermediate heads (docs/design.md#heads): files, the data they learn from, training, evaluation, and the choice of
layers and gamma. Above the model and the engines (a head is adadecode.engines.head.Head, what an engine's head()
computes); beside the decoding methods, which take heads from here through the faces only.

    files         head files: save_heads, load_heads, heads_path ("default:code", ...), bound to their model
    prompts       prompts from real sources (installed Python source, model-written requests, HumanEval, held-out chat)
    prompt_sets   the built-in templated prompt sets (load_prompts)
    recipe        the shipped heads' data recipe and its split by construction (python -m adadecode.heads.recipe)
    data          batched generation that captures hidden states on the way, in a sharded, resumable cache
    train         one head: restricted vocabulary, forward KL to the final layer
    evaluate      exit rate, accuracy and cost of heads on captured rows
    schedule_sim  AdaDecode's layer steps from head traces; the layer set and gamma chosen there
    pipeline      the steps in order, and `python -m adadecode train-heads`
    shipped/      the default model's heads and the prompt files (package data)
"""
