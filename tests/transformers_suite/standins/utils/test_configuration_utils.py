"""Stand-in (ours, nexus-retrofit) for transformers' tests/utils/test_configuration_utils.py, which the sdist lacks.

test_configuration_common.ConfigTester reads only `config_common_kwargs` from it: every general
PreTrainedConfig setting at a value other than its default, to check that a config class passes them
through. Our own choice of settings and values (not the upstream table).
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "architectures": ["NexusQwen2ForCausalLM"],
    "id2label": {0: "no", 1: "yes"},
    "label2id": {"no": 0, "yes": 1},
    "problem_type": "regression",
    "tokenizer_class": "PreTrainedTokenizerFast",
    "pad_token_id": 3,
    "bos_token_id": 4,
    "eos_token_id": 5,
    "sep_token_id": 6,
    "decoder_start_token_id": 7,
}
