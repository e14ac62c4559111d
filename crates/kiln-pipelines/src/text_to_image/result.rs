//! The typed image result every protocol reads: encoded images with their
//! MIME type and size, and the seed. Pipelines write it into their JSON
//! output (which jobs store as is); protocol adapters read it back with
//! [`ImageResult::from_output`] instead of each digging through the JSON.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One encoded output image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputImage {
    /// The encoded file, base64.
    pub base64: String,
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub mime_type: String,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
    pub width: u32,
    pub height: u32,
}

impl OutputImage {
    /// As a `data:` URL (Cog's file outputs).
    pub fn data_url(&self) -> String {
        format!("data:{};base64,{}", self.mime_type, self.base64)
    }

    /// The encoded file's bytes (empty if the base64 were damaged).
    pub fn bytes(&self) -> Vec<u8> {
        STANDARD.decode(&self.base64).unwrap_or_default()
    }
}

/// What protocols need from an image pipeline's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageResult {
    pub images: Vec<OutputImage>,
    /// The seed the images came from.
    pub seed: Option<u64>,
}

impl ImageResult {
    /// The images and seed of a pipeline's JSON output; `None` when the output
    /// holds no images (another kind of model).
    pub fn from_output(output: &Value) -> Option<Self> {
        let images = output.get("images")?.as_array()?;
        let images = images
            .iter()
            .map(|image| serde_json::from_value(image.clone()))
            .collect::<Result<Vec<OutputImage>, _>>()
            .ok()?;
        Some(ImageResult {
            images,
            seed: output.get("seed").and_then(Value::as_u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_image_output_reads_back_typed_and_other_outputs_do_not() {
        let output = json!({"model": "m", "seed": 7, "images": [
            {"base64": "aGk=", "mime_type": "image/png", "format": "png", "width": 2, "height": 1}]});
        let result = ImageResult::from_output(&output).unwrap();
        assert_eq!(result.seed, Some(7));
        assert_eq!(result.images[0].data_url(), "data:image/png;base64,aGk=");
        assert_eq!(result.images[0].bytes(), b"hi");
        assert!(ImageResult::from_output(&json!({"text": "hi"})).is_none());
        assert!(ImageResult::from_output(&json!({"images": [{"base64": 3}]})).is_none());
    }
}
