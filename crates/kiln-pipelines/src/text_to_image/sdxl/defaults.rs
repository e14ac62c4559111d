//! Stable Diffusion XL base 1.0's component configs, for single-file
//! checkpoints that ship without them (CivitAI, Illustrious): a folder's own
//! `unet/config.json` etc. win when present.

/// `unet/config.json`.
pub const UNET: &str = r#"{
  "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "cross_attention_dim": 2048, "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
  "layers_per_block": 2, "norm_eps": 1e-05, "norm_num_groups": 32,
  "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true
}"#;

/// `text_encoder/config.json` (CLIP ViT-L/14).
pub const TEXT_ENCODER: &str = r#"{
  "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
  "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-05, "eos_token_id": 2, "projection_dim": 768
}"#;

/// `text_encoder_2/config.json` (OpenCLIP ViT-bigG/14).
pub const TEXT_ENCODER_2: &str = r#"{
  "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
  "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
  "layer_norm_eps": 1e-05, "eos_token_id": 2, "projection_dim": 1280
}"#;

/// `vae/config.json`.
pub const VAE: &str = r#"{
  "in_channels": 3, "out_channels": 3, "latent_channels": 4,
  "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
  "scaling_factor": 0.13025, "use_quant_conv": true, "use_post_quant_conv": true
}"#;
