//! Compiler passes, each a function from graph to graph: weight binding,
//! constant folding, common-subexpression elimination, fusion (matmul + bias +
//! activation, element-wise chains), dead-code elimination, and the buffer
//! plan that frees each value after its last use.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{GraphError, Result};
use crate::exec;
use crate::graph::{Graph, Node, Source, Value};
use crate::ops::{BinaryOp, Instr, Op, UnaryOp};
use crate::types::{DType, shape_text};

/// Named weight tensors to bind into a graph.
pub type Weights = HashMap<String, Tensor>;

/// What compilation did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub folded: usize,
    pub merged: usize,
    pub fused: usize,
    pub removed: usize,
}

/// Replace each weight by its tensor, checking dtype and shape.
pub fn bind_weights(graph: &mut Graph, weights: &Weights) -> Result<()> {
    let mut problems = Vec::new();
    for info in graph.values.iter_mut() {
        let Source::Weight(name) = &info.source else {
            continue;
        };
        let Some(tensor) = weights.get(name) else {
            problems.push(format!("weight {name:?} is missing"));
            continue;
        };
        let expected = info.ty.static_dims().unwrap_or_default();
        if tensor.dtype() != info.ty.dtype.storage() || tensor.dims() != expected.as_slice() {
            problems.push(format!(
                "weight {name:?} is {:?}{:?}, the graph declares {}",
                tensor.dtype(),
                tensor.dims(),
                info.ty
            ));
            continue;
        }
        info.source = Source::Constant(tensor.clone());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(GraphError::Invalid(problems.join("; ")))
    }
}

/// Point every use of `from` (node inputs and graph outputs) at `to`.
fn replace_uses(graph: &mut Graph, from: Value, to: Value) {
    for node in graph.nodes.iter_mut() {
        for input in node.inputs.iter_mut() {
            if *input == from {
                *input = to;
            }
        }
    }
    for (_, out) in graph.outputs.iter_mut() {
        if *out == from {
            *out = to;
        }
    }
}

/// Keep the nodes marked `true`, renumbering node sources.
fn retain_nodes(graph: &mut Graph, keep: &[bool]) {
    let old = std::mem::take(&mut graph.nodes);
    for (node, &k) in old.into_iter().zip(keep) {
        if k {
            let index = graph.nodes.len();
            for (i, out) in node.outputs.iter().enumerate() {
                graph.values[out.0].source = Source::Node(index, i);
            }
            graph.nodes.push(node);
        }
    }
}

/// How many times each value is used (node inputs and graph outputs).
fn use_counts(graph: &Graph) -> Vec<usize> {
    let mut counts = vec![0usize; graph.values.len()];
    for node in &graph.nodes {
        for input in &node.inputs {
            counts[input.0] += 1;
        }
    }
    for (_, out) in &graph.outputs {
        counts[out.0] += 1;
    }
    counts
}

fn constant(graph: &Graph, v: Value) -> Option<&Tensor> {
    match &graph.values[v.0].source {
        Source::Constant(t) => Some(t),
        _ => None,
    }
}

/// Evaluate nodes whose inputs are all constants (and shapes that are static),
/// turning their results into constants.
pub fn fold_constants(graph: &mut Graph) -> Result<usize> {
    let mut keep = vec![true; graph.nodes.len()];
    let mut folded = 0;
    for (i, kept) in keep.iter_mut().enumerate() {
        let node = &graph.nodes[i];
        let statics: Option<Vec<Tensor>> = match &node.op {
            // A shape of static dims is known without the tensor.
            Op::Shape { .. } if graph.ty(node.inputs[0]).static_dims().is_some() => {
                let dims = graph.ty(node.inputs[0]).static_dims().unwrap_or_default();
                let probe = Tensor::zeros(dims, candle_core::DType::U8, &candle_core::Device::Cpu)?;
                Some(exec::run(&node.op, &[probe], &[DType::I64])?)
            }
            _ => {
                let inputs: Option<Vec<Tensor>> = node
                    .inputs
                    .iter()
                    .map(|&v| constant(graph, v).cloned())
                    .collect();
                match inputs {
                    Some(inputs) => {
                        let dtypes: Vec<DType> =
                            node.outputs.iter().map(|&o| graph.ty(o).dtype).collect();
                        Some(exec::run(&node.op, &inputs, &dtypes).map_err(|e| match e {
                            GraphError::Op { op, message } => GraphError::Op {
                                op: format!("{op} (node {:?})", node.name),
                                message,
                            },
                            other => other,
                        })?)
                    }
                    None => None,
                }
            }
        };
        if let Some(results) = statics {
            let outputs = graph.nodes[i].outputs.clone();
            for (out, tensor) in outputs.into_iter().zip(results) {
                graph.values[out.0].source = Source::Constant(tensor.contiguous()?);
            }
            *kept = false;
            folded += 1;
        }
    }
    retain_nodes(graph, &keep);
    Ok(folded)
}

/// Merge nodes that apply the same op to the same inputs.
pub fn eliminate_common_subexpressions(graph: &mut Graph) -> usize {
    let mut seen: HashMap<(String, Vec<Value>), Vec<Value>> = HashMap::new();
    let mut keep = vec![true; graph.nodes.len()];
    let mut merged = 0;
    for (i, kept) in keep.iter_mut().enumerate() {
        let key = (
            format!("{:?}", graph.nodes[i].op),
            graph.nodes[i].inputs.clone(),
        );
        match seen.get(&key) {
            Some(first) => {
                let first = first.clone();
                let outputs = graph.nodes[i].outputs.clone();
                for (from, to) in outputs.into_iter().zip(first) {
                    replace_uses(graph, from, to);
                }
                *kept = false;
                merged += 1;
            }
            None => {
                seen.insert(key, graph.nodes[i].outputs.clone());
            }
        }
    }
    retain_nodes(graph, &keep);
    merged
}

/// Remove nodes whose results nothing needs.
pub fn eliminate_dead_code(graph: &mut Graph) -> usize {
    let mut live = vec![false; graph.values.len()];
    for (_, out) in &graph.outputs {
        live[out.0] = true;
    }
    let mut keep = vec![false; graph.nodes.len()];
    for i in (0..graph.nodes.len()).rev() {
        if graph.nodes[i].outputs.iter().any(|o| live[o.0]) {
            keep[i] = true;
            for input in &graph.nodes[i].inputs {
                live[input.0] = true;
            }
        }
    }
    let removed = keep.iter().filter(|k| !**k).count();
    retain_nodes(graph, &keep);
    removed
}

fn producer(graph: &Graph, v: Value) -> Option<usize> {
    match graph.values[v.0].source {
        Source::Node(n, _) => Some(n),
        _ => None,
    }
}

const EPILOGUE_ACTIVATIONS: [UnaryOp; 6] = [
    UnaryOp::Relu,
    UnaryOp::Gelu,
    UnaryOp::GeluTanh,
    UnaryOp::Silu,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
];

/// `matmul → add(bias) [→ activation]` into one `matmul_bias` node when the
/// bias is a constant over the last axis and the intermediates have no other use.
pub fn fuse_matmul_bias(graph: &mut Graph) -> usize {
    let mut fused = 0;
    let mut keep = vec![true; graph.nodes.len()];
    let counts = use_counts(graph);
    for add in 0..graph.nodes.len() {
        let Op::Binary {
            kind: BinaryOp::Add,
        } = graph.nodes[add].op
        else {
            continue;
        };
        let [a, b] = [graph.nodes[add].inputs[0], graph.nodes[add].inputs[1]];
        let (product, bias) = match (producer(graph, a), producer(graph, b)) {
            (Some(p), _)
                if graph.nodes[p].op == Op::MatMul && keep[p] && constant(graph, b).is_some() =>
            {
                (p, b)
            }
            (_, Some(p))
                if graph.nodes[p].op == Op::MatMul && keep[p] && constant(graph, a).is_some() =>
            {
                (p, a)
            }
            _ => continue,
        };
        let product_out = graph.nodes[product].outputs[0];
        let out_ty = graph.ty(graph.nodes[add].outputs[0]).clone();
        let bias_ty = graph.ty(bias).clone();
        let last = out_ty.dims.last().cloned();
        let bias_fits = bias_ty.rank() == 1 && last.as_ref() == bias_ty.dims.first()
            || bias_ty.dims.iter().all(|d| d.as_static() == Some(1));
        if counts[product_out.0] != 1
            || !bias_fits
            || graph.ty(product_out) != &out_ty
            || !out_ty.dtype.is_float()
        {
            continue;
        }
        let mut inputs = graph.nodes[product].inputs.clone();
        inputs.push(bias);
        let mut outputs = graph.nodes[add].outputs.clone();
        let mut activation = None;
        // Absorb a following activation that is the sum's only use.
        if counts[outputs[0].0] == 1
            && let Some(next) =
                (add + 1..graph.nodes.len()).find(|&n| graph.nodes[n].inputs.contains(&outputs[0]))
            && let Op::Unary { kind } = graph.nodes[next].op
            && EPILOGUE_ACTIVATIONS.contains(&kind)
        {
            activation = Some(kind);
            let act_out = graph.nodes[next].outputs[0];
            replace_uses(graph, act_out, outputs[0]);
            keep[next] = false;
            outputs = vec![outputs[0]];
        }
        keep[product] = false;
        graph.nodes[add] = Node {
            op: Op::MatMulBias { activation },
            inputs,
            outputs,
            name: graph.nodes[add].name.clone(),
        };
        fused += 1;
    }
    retain_nodes(graph, &keep);
    fused
}

/// `add(x, matmul_bias(..))` into the matmul's epilogue when the product has no
/// activation and no other use, and `x` has the sum's shape (a residual).
pub fn fuse_residual_add(graph: &mut Graph) -> usize {
    let counts = use_counts(graph);
    let mut keep = vec![true; graph.nodes.len()];
    let mut fused = 0;
    for add in 0..graph.nodes.len() {
        let Op::Binary {
            kind: BinaryOp::Add,
        } = graph.nodes[add].op
        else {
            continue;
        };
        let out_ty = graph.ty(graph.nodes[add].outputs[0]).clone();
        let [a, b] = [graph.nodes[add].inputs[0], graph.nodes[add].inputs[1]];
        let candidate = |product: Value, residual: Value| {
            let p = producer(graph, product)?;
            let fusable = matches!(graph.nodes[p].op, Op::MatMulBias { activation: None })
                && graph.nodes[p].inputs.len() == 3
                && keep[p]
                && counts[product.0] == 1
                && graph.ty(residual) == &out_ty
                && graph.ty(product) == &out_ty;
            fusable.then_some((p, residual))
        };
        let Some((p, residual)) = candidate(b, a).or_else(|| candidate(a, b)) else {
            continue;
        };
        let mut inputs = graph.nodes[p].inputs.clone();
        inputs.push(residual);
        graph.nodes[add] = Node {
            op: Op::MatMulBias { activation: None },
            inputs,
            outputs: graph.nodes[add].outputs.clone(),
            name: graph.nodes[add].name.clone(),
        };
        keep[p] = false;
        fused += 1;
    }
    retain_nodes(graph, &keep);
    fused
}

fn is_fusable(graph: &Graph, node: &Node) -> bool {
    let float = node
        .outputs
        .first()
        .is_some_and(|&o| graph.ty(o).dtype.is_float());
    float
        && matches!(
            node.op,
            Op::Binary { .. } | Op::Unary { kind: _ } | Op::Fused { .. }
        )
        && !matches!(node.op, Op::Unary { kind: UnaryOp::Not })
}

/// A register of a fused program being built: a leaf operand or an instruction.
#[derive(Clone, Copy)]
enum Reg {
    Leaf(usize),
    Inst(usize),
}

/// The tree being fused under one root.
struct FuseState {
    absorbed: Vec<bool>,
    leaves: Vec<Value>,
    /// Instructions with symbolic operands, renumbered once the leaves are known.
    insts: Vec<(Instr, Vec<Reg>)>,
    members: usize,
}

impl FuseState {
    /// Emit `value` as a register, absorbing its producer when it is a fusable
    /// node whose result has no other use.
    fn emit(&mut self, graph: &Graph, counts: &[usize], value: Value, is_root: bool) -> Reg {
        let node_index = match graph.values[value.0].source {
            Source::Node(n, 0) => Some(n),
            _ => None,
        };
        let absorb = node_index.filter(|&n| {
            is_fusable(graph, &graph.nodes[n])
                && !self.absorbed[n]
                && (is_root || counts[value.0] == 1)
                && !graph.outputs.iter().any(|(_, o)| *o == value && !is_root)
        });
        let Some(n) = absorb else {
            let slot = self
                .leaves
                .iter()
                .position(|l| *l == value)
                .unwrap_or_else(|| {
                    self.leaves.push(value);
                    self.leaves.len() - 1
                });
            return Reg::Leaf(slot);
        };
        self.absorbed[n] = true;
        self.members += 1;
        let node = &graph.nodes[n];
        let args: Vec<Reg> = node
            .inputs
            .iter()
            .map(|&i| self.emit(graph, counts, i, false))
            .collect();
        match &node.op {
            Op::Fused { program } => {
                // Inline an earlier program: its leaves are `args`.
                let base = self.insts.len();
                let leaf_count = args.len();
                for instr in program {
                    let map = |r: usize| {
                        if r < leaf_count {
                            args[r]
                        } else {
                            Reg::Inst(base + r - leaf_count)
                        }
                    };
                    let (i, refs) = match *instr {
                        Instr::Unary(op, a) => (Instr::Unary(op, 0), vec![map(a)]),
                        Instr::Binary(op, a, b) => (Instr::Binary(op, 0, 0), vec![map(a), map(b)]),
                        Instr::Scalar(v) => (Instr::Scalar(v), vec![]),
                    };
                    self.insts.push((i, refs));
                }
            }
            Op::Unary { kind } => self.insts.push((Instr::Unary(*kind, 0), args)),
            Op::Binary { kind } => self.insts.push((Instr::Binary(*kind, 0, 0), args)),
            _ => return Reg::Leaf(0),
        }
        Reg::Inst(self.insts.len() - 1)
    }
}

/// Fuse trees of float element-wise ops whose intermediate results have one
/// use into single-pass programs (broadcasting commutes with element-wise ops,
/// so the leaves are broadcast once to the root's shape).
pub fn fuse_elementwise(graph: &mut Graph) -> usize {
    let counts = use_counts(graph);
    let mut absorbed = vec![false; graph.nodes.len()];
    let mut fused = 0;
    for root in (0..graph.nodes.len()).rev() {
        if absorbed[root] || !is_fusable(graph, &graph.nodes[root]) {
            continue;
        }
        let mut state = FuseState {
            absorbed: absorbed.clone(),
            leaves: Vec::new(),
            insts: Vec::new(),
            members: 0,
        };
        let root_value = graph.nodes[root].outputs[0];
        state.emit(graph, &counts, root_value, true);
        let FuseState {
            absorbed: trial_absorbed,
            leaves,
            insts,
            members,
        } = state;
        let mut program: Vec<Instr> = Vec::new();
        let already_fused = matches!(graph.nodes[root].op, Op::Fused { .. });
        if members < 2 && !already_fused {
            continue;
        }
        absorbed = trial_absorbed;
        let leaf_count = leaves.len();
        for (instr, refs) in insts {
            let r = |k: usize| match refs[k] {
                Reg::Leaf(l) => l,
                Reg::Inst(i) => leaf_count + i,
            };
            program.push(match instr {
                Instr::Unary(op, _) => Instr::Unary(op, r(0)),
                Instr::Binary(op, _, _) => Instr::Binary(op, r(0), r(1)),
                scalar @ Instr::Scalar(_) => scalar,
            });
        }
        // The root node becomes the fused node; the other members disappear.
        absorbed[root] = false;
        graph.nodes[root].op = Op::Fused { program };
        graph.nodes[root].inputs = leaves;
        if members >= 2 {
            fused += 1;
        }
    }
    let keep: Vec<bool> = absorbed.iter().map(|a| !a).collect();
    retain_nodes(graph, &keep);
    fused
}

/// Run every pass; the graph's weights must be bound.
pub fn optimize(graph: &mut Graph) -> Result<CompileReport> {
    let mut report = CompileReport {
        nodes_before: graph.nodes.len(),
        ..CompileReport::default()
    };
    report.folded = fold_constants(graph)?;
    report.merged = eliminate_common_subexpressions(graph);
    report.removed = eliminate_dead_code(graph);
    report.fused = fuse_matmul_bias(graph) + fuse_residual_add(graph) + fuse_elementwise(graph);
    report.removed += eliminate_dead_code(graph);
    report.nodes_after = graph.nodes.len();
    Ok(report)
}

/// For each node, the values whose last use it is (freed right after it runs).
pub fn buffer_plan(graph: &Graph) -> Vec<Vec<Value>> {
    let mut last_use: HashMap<Value, usize> = HashMap::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        for &input in &node.inputs {
            last_use.insert(input, i);
        }
    }
    let kept: Vec<Value> = graph.outputs.iter().map(|(_, v)| *v).collect();
    let mut plan = vec![Vec::new(); graph.nodes.len()];
    for (value, node) in last_use {
        let persistent = matches!(graph.values[value.0].source, Source::Constant(_));
        if !persistent && !kept.contains(&value) {
            plan[node].push(value);
        }
    }
    plan
}

/// A short, readable listing of a graph (for `kiln graph show` and tests).
pub fn describe(graph: &Graph) -> String {
    let mut out = String::new();
    for (name, ty) in graph.inputs() {
        out.push_str(&format!("input {name}: {ty}\n"));
    }
    for node in &graph.nodes {
        let outs: Vec<String> = node
            .outputs
            .iter()
            .map(|&o| {
                format!(
                    "%{} {}{}",
                    o.0,
                    graph.ty(o).dtype,
                    shape_text(&graph.ty(o).dims)
                )
            })
            .collect();
        let ins: Vec<String> = node.inputs.iter().map(|i| format!("%{}", i.0)).collect();
        out.push_str(&format!(
            "{} = {}({})\n",
            outs.join(", "),
            node.op.name(),
            ins.join(", ")
        ));
    }
    for (name, value) in &graph.outputs {
        out.push_str(&format!("output {name} = %{}\n", value.0));
    }
    out
}
