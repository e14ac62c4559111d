//! AutoencoderKL (FLUX's 16-channel VAE and SDXL's 4-channel one).
