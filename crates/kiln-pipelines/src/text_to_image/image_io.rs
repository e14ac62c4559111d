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

/// Hosts input images may be fetched from unless `KILN_INPUT_ALLOWED_HOSTS`
/// says otherwise: where Replicate's clients upload the files they pass.
pub const DEFAULT_INPUT_HOSTS: &[&str] = &["replicate.delivery", "replicate.com"];

/// The largest input image download (bytes) unless `KILN_INPUT_MAX_BYTES`.
pub const MAX_INPUT_DOWNLOAD: u64 = 32 << 20;

/// Where an input image may come from: files in these folders, and URLs
/// fetched under this policy (host allow-list, address checks, size limit).
#[derive(Debug, Clone)]
pub struct InputSources {
    pub dirs: Vec<PathBuf>,
    pub policy: kiln_fetch::Policy,
}

impl Default for InputSources {
    /// No folders; URLs from the default hosts, at most 32 MiB.
    fn default() -> Self {
        InputSources {
            dirs: Vec::new(),
            policy: kiln_fetch::Policy {
                allowed_hosts: DEFAULT_INPUT_HOSTS.iter().map(|h| h.to_string()).collect(),
                max_bytes: MAX_INPUT_DOWNLOAD,
                idle_timeout: std::time::Duration::from_secs(30),
                ..kiln_fetch::Policy::default()
            },
        }
    }
}

/// Download an input image through the guard: a host or size the rules refuse
/// is the request's mistake, a host that fails is the upstream's (502/504).
fn fetch_input(
    field: &str,
    url: &str,
    policy: &kiln_fetch::Policy,
) -> Result<Vec<u8>, PipelineError> {
    kiln_fetch::block_on(kiln_fetch::get_bytes(url, policy))
        .map(|(_, bytes)| bytes)
        .map_err(|e| {
            let mut message = e.to_string();
            if matches!(e, kiln_fetch::FetchError::HostNotAllowed { .. }) {
                message.push_str("; add the host to KILN_INPUT_ALLOWED_HOSTS");
            }
            match e.upstream() {
                Some(kind) => PipelineError::Upstream {
                    field: field.to_string(),
                    message,
                    timed_out: kind == kiln_fetch::UpstreamFailure::TimedOut,
                },
                None => invalid(field, message),
            }
        })
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
    // One answer whether the file is missing or outside the folders: a client
    // learns nothing about files it may not read.
    let refused = || {
        invalid(
            field,
            format!(
                "{} is not a file in the folders files may be read from ({setting})",
                path.display()
            ),
        )
    };
    let canonical = path.canonicalize().map_err(|_| refused())?;
    let inside = allowed
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .any(|dir| canonical.starts_with(dir));
    if !inside || !canonical.is_file() {
        return Err(refused());
    }
    Ok(canonical)
}

fn read_confined(field: &str, path: &Path, allowed: &[PathBuf]) -> Result<Vec<u8>, PipelineError> {
    let canonical = confined_path(field, path, allowed, "KILN_INPUT_DIRS")?;
    std::fs::read(&canonical)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
}

/// An input image read but not yet decoded: its size comes from the header,
/// so every cheap check runs before the pixels are decoded.
#[derive(Debug)]
pub struct EncodedImage {
    field: String,
    bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl EncodedImage {
    /// Decode the pixels (the costly part).
    pub fn decode(&self) -> Result<RgbImage, PipelineError> {
        let image = image::load_from_memory(&self.bytes)
            .map_err(|e| invalid(&self.field, format!("undecodable image: {e}")))?;
        Ok(image.to_rgb8())
    }
}

/// Read an input image given as base64, a `data:` URL or a path in `allowed`,
/// and its dimensions from the header; refuse it past `max_pixels` without
/// decoding it.
pub fn read_image(
    field: &str,
    text: &str,
    sources: &InputSources,
    max_pixels: u64,
) -> Result<EncodedImage, PipelineError> {
    let allowed = &sources.dirs;
    let bytes = if text.starts_with("https://") || text.starts_with("http://") {
        fetch_input(field, text.trim(), &sources.policy)?
    } else if let Some(rest) = text.strip_prefix("data:") {
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
                format!("not a URL, base64, a data URL or an allowed file path ({e})"),
            )
        })?
    };
    let reader = image::ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| invalid(field, format!("cannot read the image: {e}")))?;
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| invalid(field, format!("undecodable image: {e}")))?;
    let pixels = u64::from(width) * u64::from(height);
    let limit = max_pixels.min(MAX_INPUT_PIXELS);
    if pixels > limit {
        return Err(invalid(
            field,
            format!(
                "image is {width}x{height} ({pixels} pixels); this model takes at most {limit} (its max_pixels)"
            ),
        ));
    }
    Ok(EncodedImage {
        field: field.to_string(),
        bytes,
        width,
        height,
    })
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
            let encoded = super::result::OutputImage {
                base64: to_base64(&bytes),
                mime_type: format.mime().into(),
                format: format.name().into(),
                width: image.width(),
                height: image.height(),
            };
            serde_json::to_value(encoded)
                .map_err(|e| PipelineError::Execution(format!("encoding the result: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_sources() -> InputSources {
        InputSources {
            dirs: Vec::new(),
            policy: kiln_fetch::Policy::default(),
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    }

    /// A PNG that claims `width`×`height` and holds no pixel data: only a
    /// decoder that trusted it would allocate the whole image.
    fn png_header_only(width: u32, height: u32) -> String {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut header = width.to_be_bytes().to_vec();
        header.extend_from_slice(&height.to_be_bytes());
        header.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend(chunk(b"IHDR", &header));
        png.extend(chunk(b"IDAT", &[]));
        png.extend(chunk(b"IEND", &[]));
        STANDARD.encode(png)
    }

    #[test]
    fn oversized_images_are_refused_from_their_header() {
        let started = std::time::Instant::now();
        let Err(PipelineError::InvalidInput(problems)) = read_image(
            "image",
            &png_header_only(8192, 8192),
            &no_sources(),
            1024 * 1024,
        ) else {
            panic!("an 8192x8192 image must be refused");
        };
        assert_eq!(problems[0].field, "image");
        assert!(
            problems[0].message.contains("8192x8192") && problems[0].message.contains("1048576"),
            "{}",
            problems[0].message
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(500));

        // Within the limit the header is read, and decoding is a separate step.
        let small =
            read_image("image", &png_header_only(16, 8), &no_sources(), 1024 * 1024).unwrap();
        assert_eq!((small.width, small.height), (16, 8));
        assert!(small.decode().is_err(), "no pixel data to decode");
    }
}
