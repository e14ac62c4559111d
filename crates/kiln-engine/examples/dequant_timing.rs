//! Time one forward of a 768→3072 linear (320 rows, the mid FLUX benchmark's
//! 256² shape) dense and with each quantized weight, and the dequantization
//! alone: `cargo run --release -p kiln-engine --example dequant_timing`.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use kiln_engine::nn::Linear;
use kiln_engine::quant::{QuantKind, QuantizedWeight};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..15)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    for (rows, inp, out) in [(320, 768, 3072), (1088, 768, 3072), (320, 3072, 768)] {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &device)?;
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &device)?;
        let dense = Linear::from_parts(w.clone(), None)?;
        let base = time(|| {
            dense.forward(&x).unwrap();
        });
        print!("{rows}×{inp}→{out}: dense {base:.2} ms");
        for kind in [QuantKind::Int8, QuantKind::Q8_0, QuantKind::Q4K] {
            let q = QuantizedWeight::quantize(&w, kind)?;
            let dequant = time(|| {
                q.matrix_t(DType::F32).unwrap();
            });
            let layer = Linear::from_quantized(q, None, DType::F32, None);
            let forward = time(|| {
                layer.forward(&x).unwrap();
            });
            print!(
                " | {}: {forward:.2} ms ({:.2}×, dequant {dequant:.2} ms)",
                kind.name(),
                forward / base
            );
        }
        // W8A8 alternatives: candle's quantized matmul and Kiln's batched
        // Q8_0 kernel (activations quantized to Q8_0 as llama.cpp does).
        let q =
            candle_core::quantized::QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)?;
        let data = q.data()?.to_vec();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let kernel = time(|| {
            kiln_engine::q8_gemm::matmul(&xs, inp, &data, out).unwrap();
        });
        let qmm = candle_core::quantized::QMatMul::from_qtensor(q)?;
        let candle = time(|| {
            qmm.forward(&x).unwrap();
        });
        print!(
            " | q8_gemm W8A8 {kernel:.2} ms ({:.2}×) | candle QMatMul {candle:.2} ms ({:.2}×)",
            kernel / base,
            candle / base
        );
        println!();
    }
    Ok(())
}
