//! Weight files: safetensors (single, or sharded with `*.safetensors.index.json`)
//! memory-mapped, pickle refused, and key adapters that map a file layout's names
//! (renames, slices of fused tensors, concatenations) onto a model's own naming.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, is_gguf_file};
use crate::quant::QuantizedWeight;
use candle_core::quantized::QTensor;

/// The suffix of bitsandbytes' per-row absmax beside an int8 weight.
const BNB_ROW_SCALES: &str = ".SCB";

/// Extensions of weight files that are Python pickles (or zips of them).
pub const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

/// Whether `path` names a pickle weight file by its extension (any case).
pub fn has_pickle_extension(path: &Path) -> bool {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    PICKLE_EXTENSIONS.contains(&extension.as_str())
}

fn refuse_pickle(path: &Path) -> Result<()> {
    if has_pickle_extension(path) {
        return Err(EngineError::PickleRefused {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// One or more memory-mapped safetensors files, or one GGUF file (ComfyUI's
/// and stable-diffusion.cpp's quantized image checkpoints), seen as one set of
/// named tensors.
pub struct WeightFiles {
    store: Store,
    files: Vec<PathBuf>,
}

enum Store {
    Safetensors(MmapedSafetensors),
    Gguf(GgufFile),
}

impl WeightFiles {
    /// Open a `.safetensors` file, a `*.safetensors.index.json`, a `.gguf`
    /// file, or a folder holding one of them (an index wins; otherwise every
    /// `*.safetensors` in it; otherwise its one `.gguf`).
    pub fn open(path: &Path) -> Result<Self> {
        refuse_pickle(path)?;
        let files = if path.is_dir() {
            Self::files_in(path)?
        } else if path.to_string_lossy().ends_with(".index.json") {
            Self::files_from_index(path)?
        } else {
            vec![path.to_path_buf()]
        };
        if let [only] = files.as_slice()
            && is_gguf_file(only)
        {
            return Ok(WeightFiles {
                store: Store::Gguf(GgufFile::open(only)?),
                files,
            });
        }
        Self::open_files(files)
    }

    /// Open an explicit list of safetensors files.
    pub fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        for file in &files {
            refuse_pickle(file)?;
            if !file.is_file() {
                return Err(EngineError::NoWeights { path: file.clone() });
            }
        }
        // SAFETY: the files are mapped read-only; Kiln never writes to weight files
        // while a model is loaded, and the safetensors header is validated on open.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            EngineError::InvalidWeights {
                path: files.first().cloned().unwrap_or_default(),
                message: e.to_string(),
            }
        })?;
        Ok(WeightFiles {
            store: Store::Safetensors(tensors),
            files,
        })
    }

    /// The GGUF file behind this set, if it is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.store {
            Store::Gguf(file) => Some(file),
            Store::Safetensors(_) => None,
        }
    }

    fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(dir).map_err(|source| EngineError::Io {
            action: "read directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        if let Some(index) = names
            .iter()
            .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
        {
            return Self::files_from_index(index);
        }
        let has_extension = |p: &PathBuf, wanted: &str| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case(wanted))
        };
        let files: Vec<PathBuf> = names
            .iter()
            .filter(|p| has_extension(p, "safetensors"))
            .cloned()
            .collect();
        if !files.is_empty() {
            return Ok(files);
        }
        let ggufs: Vec<PathBuf> = names
            .into_iter()
            .filter(|p| has_extension(p, "gguf"))
            .collect();
        match ggufs.len() {
            0 => Err(EngineError::NoWeights {
                path: dir.to_path_buf(),
            }),
            1 => Ok(ggufs),
            _ => Err(EngineError::InvalidWeights {
                path: dir.to_path_buf(),
                message: format!(
                    "{} GGUF files and no safetensors: keep one ({})",
                    ggufs.len(),
                    ggufs
                        .iter()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    fn files_from_index(index: &Path) -> Result<Vec<PathBuf>> {
        let invalid = |message: String| EngineError::InvalidWeights {
            path: index.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|source| EngineError::Io {
            action: "read",
            path: index.to_path_buf(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let map = value["weight_map"]
            .as_object()
            .ok_or_else(|| invalid("no `weight_map` object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values() {
            let shard = shard
                .as_str()
                .ok_or_else(|| invalid("shard names must be strings".into()))?;
            let relative = Path::new(shard);
            if relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(invalid(format!("shard {shard:?} escapes the model folder")));
            }
            let path = dir.join(relative);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    fn describe(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every tensor name in the set.
    pub fn names(&self) -> Vec<String> {
        match &self.store {
            Store::Safetensors(tensors) => tensors
                .tensors()
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
            Store::Gguf(file) => file.tensor_names(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Safetensors(tensors) => tensors.get(name).is_ok(),
            Store::Gguf(file) => file.contains(name),
        }
    }

    fn missing(&self, name: &str) -> EngineError {
        EngineError::MissingTensor {
            name: name.to_string(),
            files: self.describe(),
        }
    }

    /// The shape stored for `name` (a GGUF tensor's original shape when its
    /// converter flattened it).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if !self.contains(name) {
            return Err(self.missing(name));
        }
        match &self.store {
            Store::Safetensors(tensors) => Ok(tensors
                .get(name)
                .map_err(|_| self.missing(name))?
                .shape()
                .to_vec()),
            Store::Gguf(file) => file.model_shape(name),
        }
    }

    /// Load `name` onto `device` as `dtype` (dequantized, from a GGUF block type).
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(self.missing(name));
        }
        match &self.store {
            Store::Safetensors(tensors) => Ok(tensors.load(name, device)?.to_dtype(dtype)?),
            Store::Gguf(file) => file.model_tensor(name, dtype, device),
        }
    }

    /// Whether linear layers read quantized weights from these files: a GGUF
    /// file, or safetensors saved with bitsandbytes 8-bit weights (`*.SCB`).
    pub fn holds_quantized(&self) -> bool {
        match &self.store {
            Store::Gguf(_) => true,
            Store::Safetensors(tensors) => tensors
                .tensors()
                .iter()
                .any(|(name, _)| name.ends_with(BNB_ROW_SCALES)),
        }
    }

    /// Weight `name` (`….weight`) as bitsandbytes 8-bit rows when it is
    /// stored as int8 beside its `….SCB` row scales; `None` otherwise.
    pub fn bnb_int8(&self, name: &str, device: &Device) -> Result<Option<QuantizedWeight>> {
        let Store::Safetensors(tensors) = &self.store else {
            return Ok(None);
        };
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(None);
        };
        let scales_name = format!("{module}{BNB_ROW_SCALES}");
        let Ok(view) = tensors.get(name) else {
            return Ok(None);
        };
        if view.dtype() != safetensors::Dtype::I8 || !self.contains(&scales_name) {
            return Ok(None);
        }
        let invalid = |message: String| EngineError::InvalidWeights {
            path: self.files.first().cloned().unwrap_or_default(),
            message: format!("{name}: {message}"),
        };
        let [rows, columns] = view.shape() else {
            return Err(invalid(format!(
                "an int8 weight of shape {:?}, expected a matrix",
                view.shape()
            )));
        };
        let codes: Vec<i8> = view.data().iter().map(|&b| b as i8).collect();
        let scales = self
            .load(&scales_name, DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        QuantizedWeight::from_int8_rows(&codes, &scales, *rows, *columns, device)
            .map(Some)
            .map_err(|e| invalid(e.to_string()))
    }

    /// `name` as stored when it is a GGUF matrix of a block type a linear
    /// layer keeps quantized; `None` for every safetensors tensor.
    pub fn block_matrix(&self, name: &str, device: &Device) -> Result<Option<QTensor>> {
        match &self.store {
            Store::Safetensors(_) => Ok(None),
            Store::Gguf(file) if file.contains(name) => file.block_matrix(name, device),
            Store::Gguf(_) => Err(self.missing(name)),
        }
    }
}

/// Where a model tensor comes from in a file layout.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// The tensor stored under this name.
    Key(String),
    /// `len` rows starting at `start` along dimension 0 of a fused tensor.
    Rows {
        key: String,
        start: usize,
        len: usize,
    },
    /// Pieces concatenated along dimension 0 (e.g. halves in swapped order).
    Concat(Vec<Source>),
    /// The transpose of a matrix (OpenCLIP stores `text_projection` as in × out).
    Transposed(Box<Source>),
}

impl Source {
    /// Every stored tensor this source reads.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Source::Key(key) | Source::Rows { key, .. } => vec![key.as_str()],
            Source::Concat(parts) => parts.iter().flat_map(Source::keys).collect(),
            Source::Transposed(inner) => inner.keys(),
        }
    }
}

/// A rename rule: `pattern` names with `{i}` placeholders for block numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRule {
    pub pattern: String,
    pub source: Source,
}

/// A layout's naming as data: rules tried in order, then prefix renames
/// (`(ours, theirs)`: a name starting with `ours` reads `theirs` + the rest);
/// other names pass through (with an optional prefix added).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyAdapter {
    pub rules: Vec<KeyRule>,
    pub prefix: String,
    pub renames: Vec<(String, String)>,
}

fn match_pattern<'a>(pattern: &str, name: &'a str) -> Option<Vec<&'a str>> {
    let pattern_parts: Vec<&str> = pattern.split('.').collect();
    let name_parts: Vec<&str> = name.split('.').collect();
    if pattern_parts.len() != name_parts.len() {
        return None;
    }
    let mut captures = Vec::new();
    for (p, n) in pattern_parts.iter().zip(&name_parts) {
        if *p == "{i}" {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            captures.push(*n);
        } else if p != n {
            return None;
        }
    }
    Some(captures)
}

fn fill(template: &str, captures: &[&str]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut captures = captures.iter();
    let mut rest = template;
    while let Some(at) = rest.find("{i}") {
        out.push_str(&rest[..at]);
        out.push_str(captures.next().copied().unwrap_or("{i}"));
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

fn fill_source(source: &Source, captures: &[&str]) -> Source {
    match source {
        Source::Key(key) => Source::Key(fill(key, captures)),
        Source::Rows { key, start, len } => Source::Rows {
            key: fill(key, captures),
            start: *start,
            len: *len,
        },
        Source::Concat(parts) => {
            Source::Concat(parts.iter().map(|p| fill_source(p, captures)).collect())
        }
        Source::Transposed(inner) => Source::Transposed(Box::new(fill_source(inner, captures))),
    }
}

impl KeyAdapter {
    /// Where the model tensor `name` comes from.
    pub fn source(&self, name: &str) -> Source {
        for rule in &self.rules {
            if let Some(captures) = match_pattern(&rule.pattern, name) {
                return fill_source(&rule.source, &captures);
            }
        }
        for (ours, theirs) in &self.renames {
            if let Some(rest) = name.strip_prefix(ours.as_str()) {
                return Source::Key(format!("{theirs}{rest}"));
            }
        }
        Source::Key(format!("{}{name}", self.prefix))
    }
}

/// A candle `VarBuilder` backend reading through a key adapter, checking shapes.
pub struct AdaptedWeights {
    files: WeightFiles,
    adapter: KeyAdapter,
    /// The last GGUF block matrix read: fused q/k/v (and a single block's
    /// `linear1`) feed three or four layers in a row, read from the file once.
    last_blocks: Mutex<Option<(String, Arc<QTensor>)>>,
}

impl AdaptedWeights {
    pub fn new(files: WeightFiles, adapter: KeyAdapter) -> Self {
        AdaptedWeights {
            files,
            adapter,
            last_blocks: Mutex::new(None),
        }
    }

    /// Resolve a model tensor name to a tensor.
    pub fn fetch(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.materialise(&self.adapter.source(name), name, dtype, device)
    }

    fn materialise(
        &self,
        source: &Source,
        wanted: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match source {
            Source::Key(key) => self.files.load(key, dtype, device).map_err(|e| match e {
                EngineError::MissingTensor { files, .. } if key != wanted => {
                    EngineError::MissingTensor {
                        name: format!("{key} (for {wanted})"),
                        files,
                    }
                }
                other => other,
            }),
            Source::Rows { key, start, len } => {
                let full = self.files.load(key, dtype, device)?;
                let rows = full.dim(0)?;
                if start + len > rows {
                    return Err(EngineError::ShapeMismatch {
                        name: format!("{key} (for {wanted})"),
                        files: self.files.describe(),
                        expected: vec![start + len],
                        found: full.dims().to_vec(),
                    });
                }
                Ok(full.narrow(0, *start, *len)?)
            }
            Source::Concat(parts) => {
                let tensors = parts
                    .iter()
                    .map(|p| self.materialise(p, wanted, dtype, device))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&tensors, 0)?)
            }
            Source::Transposed(inner) => Ok(self
                .materialise(inner, wanted, dtype, device)?
                .t()?
                .contiguous()?),
        }
    }

    pub fn files(&self) -> &WeightFiles {
        &self.files
    }

    /// The model tensor `name` as stored blocks, when every piece it reads is
    /// a block-typed GGUF matrix (fused q/k/v rows split as whole rows);
    /// `None` otherwise (the dense path then reads it).
    pub fn fetch_blocks(&self, name: &str, device: &Device) -> Result<Option<Arc<QTensor>>> {
        let Some(parts) = self.block_parts(&self.adapter.source(name), device)? else {
            return Ok(None);
        };
        if let [(tensor, 0, len)] = parts.as_slice()
            && tensor.shape().dims2()?.0 == *len
        {
            return Ok(Some(Arc::clone(tensor)));
        }
        let borrowed: Vec<(&QTensor, usize, usize)> = parts
            .iter()
            .map(|(t, start, len)| (t.as_ref(), *start, *len))
            .collect();
        crate::gguf::take_rows(&borrowed)
            .map(|t| Some(Arc::new(t)))
            .map_err(|e| EngineError::InvalidWeights {
                path: self.files.files.first().cloned().unwrap_or_default(),
                message: format!("{name}: {e}"),
            })
    }

    #[allow(clippy::type_complexity)]
    fn block_parts(
        &self,
        source: &Source,
        device: &Device,
    ) -> Result<Option<Vec<(Arc<QTensor>, usize, usize)>>> {
        let whole = |key: &str| -> Result<Option<Arc<QTensor>>> {
            if !self.files.contains(key) {
                return Ok(None);
            }
            let mut last = self
                .last_blocks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((held, tensor)) = last.as_ref()
                && held == key
            {
                return Ok(Some(Arc::clone(tensor)));
            }
            let read = self.files.block_matrix(key, device)?.map(Arc::new);
            if let Some(tensor) = &read {
                *last = Some((key.to_string(), Arc::clone(tensor)));
            }
            Ok(read)
        };
        Ok(match source {
            Source::Key(key) => whole(key)?.map(|t| {
                let rows = t.shape().dims()[0];
                vec![(t, 0, rows)]
            }),
            Source::Rows { key, start, len } => whole(key)?.map(|t| vec![(t, *start, *len)]),
            Source::Concat(pieces) => {
                let mut parts = Vec::new();
                for piece in pieces {
                    match self.block_parts(piece, device)? {
                        Some(more) => parts.extend(more),
                        None => return Ok(None),
                    }
                }
                Some(parts)
            }
            Source::Transposed(_) => None,
        })
    }
}

impl crate::quant::StoredQuantized for AdaptedWeights {
    fn quantized(
        &self,
        name: &str,
        device: &Device,
    ) -> candle_core::Result<Option<crate::quant::QuantizedWeight>> {
        if let Some(blocks) = self
            .fetch_blocks(name, device)
            .map_err(candle_core::Error::wrap)?
        {
            return crate::quant::QuantizedWeight::from_blocks(blocks).map(Some);
        }
        match self.adapter.source(name) {
            Source::Key(key) => self
                .files
                .bnb_int8(&key, device)
                .map_err(candle_core::Error::wrap),
            _ => Ok(None),
        }
    }
}

/// An [`AdaptedWeights`] shared between a var builder and the load's
/// [`crate::quant::while_reading_quantized`], so quantized weights (GGUF
/// blocks, bitsandbytes int8 rows) reach the linear layers as stored.
#[derive(Clone)]
pub struct SharedWeights(pub Arc<AdaptedWeights>);

impl SimpleBackend for SharedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

impl SimpleBackend for AdaptedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .fetch(name, dtype, device)
            .map_err(candle_core::Error::wrap)?;
        crate::resident::record(crate::resident::tensor_bytes(&tensor));
        if tensor.shape() != &shape {
            return Err(candle_core::Error::wrap(EngineError::ShapeMismatch {
                name: name.to_string(),
                files: self.files.describe(),
                expected: shape.dims().to_vec(),
                found: tensor.dims().to_vec(),
            }));
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, device)
            .map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let source = self.adapter.source(name);
        let keys = source.keys();
        !keys.is_empty() && keys.iter().all(|key| self.files.contains(key))
    }
}

/// Tensors by name, for tests and small fixtures.
pub fn load_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    refuse_pickle(path)?;
    Ok(candle_core::safetensors::load(path, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_capture_block_numbers_and_fill_templates() {
        let adapter = KeyAdapter {
            rules: vec![KeyRule {
                pattern: "blocks.{i}.attn.to_k.weight".into(),
                source: Source::Rows {
                    key: "double_blocks.{i}.qkv.weight".into(),
                    start: 8,
                    len: 8,
                },
            }],
            prefix: "model.".into(),
            renames: vec![("a.b.".into(), "x.y.z.".into())],
        };
        assert_eq!(
            adapter.source("a.b.c.weight"),
            Source::Key("x.y.z.c.weight".into())
        );
        assert_eq!(
            adapter.source("blocks.12.attn.to_k.weight"),
            Source::Rows {
                key: "double_blocks.12.qkv.weight".into(),
                start: 8,
                len: 8
            }
        );
        assert_eq!(
            adapter.source("blocks.x.attn.to_k.weight"),
            Source::Key("model.blocks.x.attn.to_k.weight".into())
        );
    }

    #[test]
    fn fused_rows_and_concats_materialise_with_shape_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let device = Device::Cpu;
        let fused = Tensor::arange(0f32, 12.0, &device)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        candle_core::safetensors::save(&HashMap::from([("qkv".to_string(), fused)]), &path)
            .unwrap();
        let adapter = KeyAdapter {
            rules: vec![
                KeyRule {
                    pattern: "k".into(),
                    source: Source::Rows {
                        key: "qkv".into(),
                        start: 2,
                        len: 2,
                    },
                },
                KeyRule {
                    pattern: "swapped".into(),
                    source: Source::Concat(vec![
                        Source::Rows {
                            key: "qkv".into(),
                            start: 3,
                            len: 3,
                        },
                        Source::Rows {
                            key: "qkv".into(),
                            start: 0,
                            len: 3,
                        },
                    ]),
                },
                KeyRule {
                    pattern: "qkv_t".into(),
                    source: Source::Transposed(Box::new(Source::Key("qkv".into()))),
                },
            ],
            prefix: String::new(),
            renames: Vec::new(),
        };
        let weights = AdaptedWeights::new(WeightFiles::open(&path).unwrap(), adapter);
        let k = weights.fetch("k", DType::F32, &device).unwrap();
        assert_eq!(
            k.to_vec2::<f32>().unwrap(),
            vec![vec![4.0, 5.0], vec![6.0, 7.0]]
        );
        let swapped = weights.fetch("swapped", DType::F32, &device).unwrap();
        assert_eq!(swapped.to_vec2::<f32>().unwrap()[0], vec![6.0, 7.0]);
        let transposed = weights.fetch("qkv_t", DType::F32, &device).unwrap();
        assert_eq!(transposed.dims(), &[2, 6]);
        assert_eq!(transposed.to_vec2::<f32>().unwrap()[1][0], 1.0);
        assert!(SimpleBackend::contains_tensor(&weights, "qkv_t"));
        let err = SimpleBackend::get(
            &weights,
            Shape::from((3, 2)),
            "k",
            candle_nn::Init::Const(0.0),
            DType::F32,
            &device,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("has shape [2, 2], the model expects [3, 2]"),
            "{err}"
        );
        let err = weights
            .fetch("missing", DType::F32, &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"missing\" is missing from") && err.contains("w.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn pickle_and_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = dir.path().join("model.ckpt");
        std::fs::write(&pickle, b"not really").unwrap();
        assert!(matches!(
            WeightFiles::open(&pickle),
            Err(EngineError::PickleRefused { .. })
        ));
        let truncated = dir.path().join("t.safetensors");
        std::fs::write(&truncated, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        let err = WeightFiles::open(&truncated).err().unwrap().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
    }
}
