"""Architectures of well-known hub models, so `plan` works offline (no download) for the shipped recipes.

`plan` first asks transformers for the config (a local directory, or the hub cache); only when that fails does
it look here. These are the published config.json values that matter for memory (sizes, vocabulary, tying,
experts) and for validation (positions, special token ids), copied from each model's config.json on the hub.
RoPE scalings that only stretch positions (Phi-4-mini's longrope factors, Gemma 3's linear factor 8) are left out:
they change no byte of the plan.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 8192, "tie_word_embeddings": False, "rope_theta": 500000.0}
_LLAMA3_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 8192, "tie_word_embeddings": False, "rope_theta": 500000.0}
_LLAMA3_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "tie_word_embeddings": True, "rope_theta": 500000.0}
_LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}

# Qwen/Qwen2.5-7B config.json (the Instruct model's says max_position_embeddings 32768)
_QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
              "max_position_embeddings": 131072, "tie_word_embeddings": False, "rope_theta": 1000000.0,
              "bos_token_id": 151643, "eos_token_id": 151643}
# Qwen/Qwen3-8B config.json (Qwen3-8B-Base: the same sizes, max_position_embeddings 32768)
_QWEN3_8B = {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
             "max_position_embeddings": 40960, "tie_word_embeddings": False, "rope_theta": 1000000.0,
             "bos_token_id": 151643, "eos_token_id": 151645}
# Qwen/Qwen3-30B-A3B config.json: 48 layers of 128 experts (8 active per token) of intermediate size 768
_QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                  "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                  "tie_word_embeddings": False, "rope_theta": 1000000.0, "output_router_logits": False,
                  "router_aux_loss_coef": 0.001, "bos_token_id": 151643, "eos_token_id": 151645}
# mistralai/Mistral-7B-v0.1 config.json (sliding window 4096) and v0.3 (vocabulary 32768, no window)
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
               "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False,
               "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
_MISTRAL_7B_V03 = {**_MISTRAL_7B, "vocab_size": 32768, "sliding_window": None, "rope_theta": 1000000.0}
# google/gemma-2-9b config.json: sliding (4096) and global layers alternate, soft-capped attention and logits
_GEMMA2_9B = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
              "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": 256,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
              "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
# google/gemma-3-12b-pt config.json's text_config: its language model (the 0.4B vision tower is not counted)
_GEMMA3_12B = {"model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
               "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208,
               "max_position_embeddings": 131072, "sliding_window": 1024, "query_pre_attn_scalar": 256,
               "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
# microsoft/Phi-3-mini-4k-instruct config.json: fused qkv and gate_up projections, pad id 32000
_PHI3_MINI = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
              "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "sliding_window": 2047,
              "tie_word_embeddings": False, "rope_theta": 10000.0, "pad_token_id": 32000, "bos_token_id": 1,
              "eos_token_id": 32000}
# microsoft/Phi-4-mini-instruct config.json: grouped queries, a 200k vocabulary, tied embeddings
_PHI4_MINI = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
              "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
              "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "partial_rotary_factor": 0.75, "tie_word_embeddings": True, "rope_theta": 10000.0,
              "pad_token_id": 199999, "bos_token_id": 199999, "eos_token_id": 199999}
# mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts, 2 active per token
_MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                 "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
                 "tie_word_embeddings": False, "rope_theta": 1000000.0, "output_router_logits": False,
                 "router_aux_loss_coef": 0.02, "bos_token_id": 1, "eos_token_id": 2}

KNOWN: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    "meta-llama/Llama-3.1-8B-Instruct": {**_LLAMA3_8B, "max_position_embeddings": 131072},
    "meta-llama/Meta-Llama-3-70B": _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.2-1B": _LLAMA3_1B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA3_1B,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "huggyllama/llama-7b": _LLAMA2_7B,
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": False},
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": {**_QWEN25_7B, "max_position_embeddings": 32768, "eos_token_id": 151645},
    "Qwen/Qwen3-8B": _QWEN3_8B,
    "Qwen/Qwen3-8B-Base": {**_QWEN3_8B, "max_position_embeddings": 32768, "eos_token_id": 151643},
    "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B-Base": {**_QWEN3_30B_A3B, "max_position_embeddings": 32768, "eos_token_id": 151643},
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": {**_MISTRAL_7B, "sliding_window": None, "rope_theta": 1000000.0},
    "mistralai/Mistral-7B-v0.3": _MISTRAL_7B_V03,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B_V03,
    "google/gemma-2-9b": _GEMMA2_9B,
    "google/gemma-2-9b-it": _GEMMA2_9B,
    "google/gemma-3-12b-pt": _GEMMA3_12B,
    "google/gemma-3-12b-it": _GEMMA3_12B,
    "microsoft/Phi-3-mini-4k-instruct": _PHI3_MINI,
    "microsoft/Phi-4-mini-instruct": _PHI4_MINI,
    "mistralai/Mixtral-8x7B-v0.1": _MIXTRAL_8X7B,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _MIXTRAL_8X7B,
    "Qwen/Qwen2.5-1.5B": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                          "vocab_size": 151936, "max_position_embeddings": 131072, "tie_word_embeddings": True},
}
