"""The checkpoints of the GPU equality tests (one GPU and tensor-parallel): wider than the CPU demo so
head_dim is 64, a size the kernels are tuned for; 4 heads (2 KV heads for the Llama family), 2 per rank
at TP=2."""

NUM_PROMPTS, MAX_TOKENS = 16, 64
WIDE = {
    "gpt2": dict(n_embd=256, n_head=4),
    "gpt_neox": dict(hidden_size=256, num_attention_heads=4, intermediate_size=512),
    "opt": dict(hidden_size=256, num_attention_heads=4, ffn_dim=512),
}
WIDE_LLAMA = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=512)
# The trained checkpoint: one passage per prompt, prompts of 4..192 tokens, then 64 memorized tokens.
PASSAGE_LEN, TRAIN_STEPS = 256, 150
