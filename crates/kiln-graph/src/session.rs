//! InferenceSession: compile a graph with its weights once into a `Model`, then
//! execute it many times from any thread, with every input problem reported at once.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::compile::{self, CompileReport, Weights};
use crate::error::{GraphError, InputProblem, Result};
use crate::exec;
use crate::graph::{Graph, Source, Value};
use crate::types::{DType, Dim, TensorType};

/// How a session compiles graphs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Run the optimisation passes (folding, CSE, fusion, DCE). Off, the graph
    /// runs as built: for debugging a pass.
    pub optimize: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { optimize: true }
    }
}

/// Compiles graphs into executable models.
#[derive(Debug, Clone, Default)]
pub struct InferenceSession {
    options: SessionOptions,
}

impl InferenceSession {
    pub fn new(options: SessionOptions) -> Self {
        InferenceSession { options }
    }

    /// Bind `weights`, compile, and plan buffers.
    pub fn load(&self, graph: &Graph, weights: &Weights) -> Result<Model> {
        let mut compiled = graph.clone();
        compile::bind_weights(&mut compiled, weights)?;
        let report = if self.options.optimize {
            compile::optimize(&mut compiled)?
        } else {
            CompileReport {
                nodes_before: compiled.nodes().len(),
                nodes_after: compiled.nodes().len(),
                ..CompileReport::default()
            }
        };
        let frees = compile::buffer_plan(&compiled);
        let signature = Signature {
            inputs: graph
                .inputs()
                .into_iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
            outputs: graph
                .outputs()
                .into_iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        };
        Ok(Model {
            inner: Arc::new(Compiled {
                graph: compiled,
                frees,
                report,
                signature,
            }),
        })
    }
}

/// A model's typed inputs and outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub inputs: Vec<(String, TensorType)>,
    pub outputs: Vec<(String, TensorType)>,
}

#[derive(Debug)]
struct Compiled {
    graph: Graph,
    frees: Vec<Vec<Value>>,
    report: CompileReport,
    signature: Signature,
}

/// A compiled graph, cheap to clone and safe to execute from many threads.
#[derive(Debug, Clone)]
pub struct Model {
    inner: Arc<Compiled>,
}

impl Model {
    pub fn signature(&self) -> &Signature {
        &self.inner.signature
    }

    pub fn report(&self) -> &CompileReport {
        &self.inner.report
    }

    /// The compiled graph (after the passes).
    pub fn graph(&self) -> &Graph {
        &self.inner.graph
    }

    /// Check inputs against the signature: names, dtypes, ranks, static dims,
    /// and one size per symbol across inputs. Every problem is reported.
    pub fn validate(&self, inputs: &HashMap<String, Tensor>) -> Result<()> {
        let mut problems = Vec::new();
        let mut symbols: HashMap<&str, (usize, &str)> = HashMap::new();
        for (name, ty) in &self.inner.signature.inputs {
            let problem = |message: String| InputProblem {
                input: name.clone(),
                message,
            };
            let Some(tensor) = inputs.get(name) else {
                problems.push(problem(format!("is missing (expected {ty})")));
                continue;
            };
            if tensor.dtype() != ty.dtype.storage() {
                problems.push(problem(format!(
                    "has dtype {}, expected {}",
                    candle_name(tensor.dtype()),
                    ty.dtype
                )));
            }
            if tensor.rank() != ty.rank() {
                problems.push(problem(format!(
                    "has shape {:?} (rank {}), expected {} (rank {})",
                    tensor.dims(),
                    tensor.rank(),
                    crate::types::shape_text(&ty.dims),
                    ty.rank()
                )));
                continue;
            }
            for (axis, (dim, &size)) in ty.dims.iter().zip(tensor.dims()).enumerate() {
                match dim {
                    Dim::Static(n) if *n != size => problems.push(problem(format!(
                        "dimension {axis} is {size}, expected {n} (shape {:?} vs {})",
                        tensor.dims(),
                        crate::types::shape_text(&ty.dims)
                    ))),
                    Dim::Symbolic(symbol) => match symbols.get(symbol.as_str()) {
                        Some((bound, by)) if *bound != size => problems.push(problem(format!(
                            "dimension {axis} ({symbol}) is {size}, but input {by:?} set {symbol} = {bound}"
                        ))),
                        Some(_) => {}
                        None => {
                            symbols.insert(symbol, (size, name));
                        }
                    },
                    _ => {}
                }
            }
        }
        for name in inputs.keys() {
            if !self.inner.signature.inputs.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = self
                    .inner
                    .signature
                    .inputs
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect();
                problems.push(InputProblem {
                    input: name.clone(),
                    message: format!(
                        "is not an input of this model (inputs: {})",
                        known.join(", ")
                    ),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            problems.sort_by(|a, b| a.input.cmp(&b.input));
            Err(GraphError::Inputs(problems))
        }
    }

    /// Run the model; results in the signature's output order.
    pub fn execute(&self, inputs: &HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>> {
        self.run(inputs, None)
    }

    /// Run the model, adding each node's wall time to `profile` under its op's
    /// name (for `kiln bench graph --profile`).
    pub fn execute_profiled(
        &self,
        inputs: &HashMap<String, Tensor>,
        profile: &mut HashMap<&'static str, std::time::Duration>,
    ) -> Result<Vec<(String, Tensor)>> {
        self.run(inputs, Some(profile))
    }

    fn run(
        &self,
        inputs: &HashMap<String, Tensor>,
        mut profile: Option<&mut HashMap<&'static str, std::time::Duration>>,
    ) -> Result<Vec<(String, Tensor)>> {
        self.validate(inputs)?;
        let graph = &self.inner.graph;
        let mut slots: Vec<Option<Tensor>> = vec![None; graph.values.len()];
        for (value, info) in graph.values() {
            match &info.source {
                Source::Constant(t) => slots[value.index()] = Some(t.clone()),
                Source::Input(name) => slots[value.index()] = inputs.get(name).cloned(),
                _ => {}
            }
        }
        for (i, node) in graph.nodes().iter().enumerate() {
            let operands: Vec<Tensor> = node
                .inputs
                .iter()
                .map(|v| {
                    slots[v.index()].clone().ok_or_else(|| {
                        GraphError::Invalid(format!("value %{} is not computed", v.index()))
                    })
                })
                .collect::<Result<_>>()?;
            let dtypes: Vec<DType> = node.outputs.iter().map(|&o| graph.ty(o).dtype).collect();
            let started = profile.as_ref().map(|_| std::time::Instant::now());
            let results = exec::run(&node.op, &operands, &dtypes).map_err(|e| match e {
                GraphError::Op { op, message } if !node.name.is_empty() => GraphError::Op {
                    op: format!("{op} (node {:?})", node.name),
                    message,
                },
                other => other,
            })?;
            drop(operands);
            if let (Some(profile), Some(started)) = (profile.as_deref_mut(), started) {
                *profile.entry(node.op.name()).or_default() += started.elapsed();
            }
            for (out, tensor) in node.outputs.iter().zip(results) {
                slots[out.index()] = Some(tensor);
            }
            for freed in &self.inner.frees[i] {
                slots[freed.index()] = None;
            }
        }
        graph
            .output_values()
            .iter()
            .map(|(name, v)| {
                let t = slots[v.index()].clone().ok_or_else(|| {
                    GraphError::Invalid(format!("output {name:?} was not computed"))
                })?;
                Ok((name.clone(), t.contiguous()?))
            })
            .collect()
    }
}

fn candle_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::U8 => "u8/bool",
        candle_core::DType::I32 => "i32",
        candle_core::DType::I64 => "i64",
        candle_core::DType::F16 => "f16",
        candle_core::DType::BF16 => "bf16",
        candle_core::DType::F32 => "f32",
        candle_core::DType::F64 => "f64",
        _ => "an unsupported type",
    }
}

/// Read every tensor of safetensors files as weights (refusing duplicates).
pub fn load_safetensors(paths: &[std::path::PathBuf]) -> Result<Weights> {
    let mut weights = Weights::new();
    for path in paths {
        let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| GraphError::malformed(&path.display().to_string(), e.to_string()))?;
        for (name, tensor) in tensors {
            if weights.insert(name.clone(), tensor).is_some() {
                return Err(GraphError::Invalid(format!(
                    "weight {name:?} appears in more than one file"
                )));
            }
        }
    }
    Ok(weights)
}
