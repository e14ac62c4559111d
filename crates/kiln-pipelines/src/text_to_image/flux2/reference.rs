//! Reference images for FLUX.2 editing as `Flux2KleinPipeline` prepares
//! them: above one megapixel scaled down to about one (keeping the aspect
//! ratio), each side floored to a multiple of twice the VAE scale, centre
//! cropped to that, then to [-1, 1]. The pipeline's own checks come first:
//! both sides at least 64 pixels, aspect ratio at most 8:1.

use image::RgbImage;

use crate::error::{PipelineError, ProblemKind};
use crate::text_to_image::image_io::image_tensor;

/// Area above which a reference image is scaled down (diffusers' 1024²).
const MAX_AREA: u64 = 1024 * 1024;

/// Check a reference image's size as the pipeline does, naming `field`.
pub fn check_reference_size(field: &str, width: u32, height: u32) -> Result<(), PipelineError> {
    if width < 64 || height < 64 {
        return Err(PipelineError::invalid(
            field,
            ProblemKind::Constraint,
            format!("is {width}x{height}; both sides must be at least 64 pixels"),
        ));
    }
    let ratio = f64::from(width.max(height)) / f64::from(width.min(height));
    if ratio > 8.0 {
        return Err(PipelineError::invalid(
            field,
            ProblemKind::Constraint,
            format!("is {width}x{height} (aspect ratio {ratio:.1}:1); at most 8:1 is allowed"),
        ));
    }
    Ok(())
}

/// The size a reference image is used at: (width, height), multiples of `multiple`.
pub fn reference_size(width: u32, height: u32, multiple: usize) -> (usize, usize) {
    let (mut w, mut h) = (width as usize, height as usize);
    if u64::from(width) * u64::from(height) > MAX_AREA {
        let scale = (MAX_AREA as f64 / (f64::from(width) * f64::from(height))).sqrt();
        w = (f64::from(width) * scale) as usize;
        h = (f64::from(height) * scale) as usize;
    }
    ((w / multiple) * multiple, (h / multiple) * multiple)
}

/// The image as the transformer's reference: (1, 3, H, W) in [-1, 1].
/// Scaling above one megapixel uses Lanczos-3 as PIL does, but not PIL's
/// exact kernel: such images are close to diffusers', not identical.
pub fn reference_tensor(
    image: &RgbImage,
    multiple: usize,
) -> Result<candle_core::Tensor, PipelineError> {
    let (width, height) = reference_size(image.width(), image.height(), multiple);
    let scaled;
    let source = if u64::from(image.width()) * u64::from(image.height()) > MAX_AREA {
        let scale =
            (MAX_AREA as f64 / (f64::from(image.width()) * f64::from(image.height()))).sqrt();
        scaled = image::imageops::resize(
            image,
            (f64::from(image.width()) * scale) as u32,
            (f64::from(image.height()) * scale) as u32,
            image::imageops::FilterType::Lanczos3,
        );
        &scaled
    } else {
        image
    };
    let left = (source.width() as usize - width) / 2;
    let top = (source.height() as usize - height) / 2;
    let cropped =
        image::imageops::crop_imm(source, left as u32, top as u32, width as u32, height as u32)
            .to_image();
    image_tensor(&cropped, width, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_floor_to_the_grid_and_large_images_scale_to_a_megapixel() {
        assert_eq!(reference_size(72, 68, 16), (64, 64));
        assert_eq!(reference_size(2048, 1024, 16), (1440, 720));
        assert!(check_reference_size("image", 63, 100).is_err());
        assert!(check_reference_size("image", 64, 600).is_err());
        assert!(check_reference_size("image", 64, 512).is_ok());
    }
}
