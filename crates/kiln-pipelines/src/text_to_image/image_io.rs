//! Images in and out of text-to-image pipelines: decoding base64, data URLs or
//! files inside allowed folders, and encoding PNG/JPEG/WebP.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use candle_core::Tensor;
use image::{DynamicImage, ImageFormat, RgbImage};

use crate::error::{PipelineError, ProblemKind};

/// Largest accepted input image, in pixels (decompression-bomb guard).
pub const MAX_INPUT_PIXELS: u64 = 64 * 1024 * 1024;

fn invalid(field: &str, message: String) -> PipelineError {
    PipelineError::invalid(field, ProblemKind::Constraint, message)
}

/// Folders input files may be read from (`KILN_INPUT_DIRS`, `:`-separated).
pub fn allowed_input_dirs() -> Vec<PathBuf> {
    dirs_from_env("KILN_INPUT_DIRS")
}

/// The `:`-separated folders in environment variable `name`.
pub fn dirs_from_env(name: &str) -> Vec<PathBuf> {
    std::env::var(name)
        .map(|v| {
            v.split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// `path` resolved (symlinks and `..` included) if it lies inside one of
/// `allowed`; otherwise an error on `field` naming `setting`, the variable that
/// lists the allowed folders.
pub fn confined_path(
    field: &str,
    path: &Path,
    allowed: &[PathBuf],
    setting: &str,
) -> Result<PathBuf, PipelineError> {
    let canonical = path
        .canonicalize()
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let inside = allowed
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .any(|dir| canonical.starts_with(dir));
    if !inside {
        return Err(invalid(
            field,
            format!(
                "{} is outside the folders files may be read from ({setting})",
                path.display()
            ),
        ));
    }
    Ok(canonical)
}

fn read_confined(field: &str, path: &Path, allowed: &[PathBuf]) -> Result<Vec<u8>, PipelineError> {
    let canonical = confined_path(field, path, allowed, "KILN_INPUT_DIRS")?;
    std::fs::read(&canonical)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
}

/// Decode an input image given as base64, a `data:` URL or a path in `allowed`.
pub fn decode_image(
    field: &str,
    text: &str,
    allowed: &[PathBuf],
) -> Result<RgbImage, PipelineError> {
    let bytes = if let Some(rest) = text.strip_prefix("data:") {
        let (_, data) = rest.split_once(";base64,").ok_or_else(|| {
            invalid(
                field,
                "data URLs must be base64 (data:image/png;base64,...)".into(),
            )
        })?;
        STANDARD
            .decode(data.trim())
            .map_err(|e| invalid(field, format!("invalid base64 in data URL: {e}")))?
    } else if text.starts_with('/') || text.starts_with("./") || text.starts_with("file://") {
        read_confined(
            field,
            Path::new(text.trim_start_matches("file://")),
            allowed,
        )?
    } else {
        STANDARD.decode(text.trim()).map_err(|e| {
            invalid(
                field,
                format!("not base64, a data URL or an allowed file path ({e})"),
            )
        })?
    };
    let reader = image::ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| invalid(field, format!("cannot read the image: {e}")))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| invalid(field, format!("undecodable image: {e}")))?;
    if u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS {
        return Err(invalid(
            field,
            format!("image is {w}x{h}, larger than {MAX_INPUT_PIXELS} pixels"),
        ));
    }
    let image = image::load_from_memory(&bytes)
        .map_err(|e| invalid(field, format!("undecodable image: {e}")))?;
    Ok(image.to_rgb8())
}

/// Output encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "png" => Some(OutputFormat::Png),
            "jpeg" | "jpg" => Some(OutputFormat::Jpeg),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

/// Encode an RGB image; `quality` (1–100) applies to JPEG (WebP is lossless here).
pub fn encode_image(
    image: &RgbImage,
    format: OutputFormat,
    quality: u8,
) -> Result<Vec<u8>, PipelineError> {
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        OutputFormat::Png => image.write_to(&mut out, ImageFormat::Png),
        OutputFormat::Webp => {
            DynamicImage::ImageRgb8(image.clone()).write_to(&mut out, ImageFormat::WebP)
        }
        OutputFormat::Jpeg => {
            let encoder =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            image.write_with_encoder(encoder)
        }
    };
    result.map_err(|e| PipelineError::Execution(format!("encoding {}: {e}", format.name())))?;
    Ok(out.into_inner())
}

/// Base64 of bytes (standard alphabet, padded).
pub fn to_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// (B, H, W, 3) floats in [0, 1] → RGB images, rounding as diffusers' `numpy_to_pil`.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
    let run = |e: candle_core::Error| PipelineError::Execution(e.to_string());
    let (b, h, w, _) = images.dims4().map_err(run)?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let pixels: Vec<f32> = images
            .get(i)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(run)?;
        let bytes: Vec<u8> = pixels
            .iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        let image = RgbImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| PipelineError::Execution("image buffer size mismatch".into()))?;
        out.push(image);
    }
    Ok(out)
}

/// An RGB image resized to (width, height) as a (1, 3, H, W) tensor in [-1, 1]
/// (diffusers' preprocessing: /255, ×2 − 1; Lanczos resize when sizes differ).
pub fn image_tensor(
    image: &RgbImage,
    width: usize,
    height: usize,
) -> Result<Tensor, PipelineError> {
    let resized;
    let image = if image.width() as usize != width || image.height() as usize != height {
        resized = image::imageops::resize(
            image,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        );
        &resized
    } else {
        image
    };
    let data: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|v| f32::from(*v) / 255.0 * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(data, (1, height, width, 3), &candle_core::Device::Cpu)
        .and_then(|t| t.permute((0, 3, 1, 2)))
        .and_then(|t| t.contiguous())
        .map_err(|e| PipelineError::Execution(e.to_string()))
}

/// An inpainting mask as (1, 1, H, W): grayscale as PIL's `convert("L")`,
/// then 1 where it is at least half white (diffusers' binarised mask).
pub fn mask_tensor(mask: &RgbImage) -> Result<Tensor, PipelineError> {
    let (width, height) = (mask.width() as usize, mask.height() as usize);
    let data: Vec<f32> = mask
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            let luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            if luma as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }
        })
        .collect();
    Tensor::from_vec(data, (1, 1, height, width), &candle_core::Device::Cpu)
        .map_err(|e| PipelineError::Execution(e.to_string()))
}

/// Encoded images as responses carry them: base64 with MIME type, format and size.
pub fn images_json(
    images: &[RgbImage],
    format: OutputFormat,
    quality: u8,
) -> Result<Vec<serde_json::Value>, PipelineError> {
    images
        .iter()
        .map(|image| {
            let bytes = encode_image(image, format, quality)?;
            Ok(serde_json::json!({
                "base64": to_base64(&bytes),
                "mime_type": format.mime(),
                "format": format.name(),
                "width": image.width(),
                "height": image.height(),
            }))
        })
        .collect()
}
