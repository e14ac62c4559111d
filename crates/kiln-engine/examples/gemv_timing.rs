//! Times one-row quantized matmuls (LLM decode's GEMVs): candle's QMatMul
//! (repacked AVX-512 tiles where it has them) against its compact-block
//! `k_quants::matmul`, for Q8_0, Q4_K and Q6_K at decode shapes.
//! `cargo run --release -p kiln-engine --example gemv_timing`

use std::time::Instant;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8_0, GgmlType, matmul};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let runs = 50;
    let started = Instant::now();
    for _ in 0..runs {
        f();
    }
    started.elapsed().as_secs_f64() / runs as f64
}

fn compact<T: GgmlType>(q: &QTensor) -> Vec<T> {
    let data = q.data().unwrap();
    let n = data.len() / std::mem::size_of::<T>();
    let mut out = vec![T::zeros(); n];
    // SAFETY: `out` holds exactly `data.len()` bytes of plain-old-data blocks.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), out.as_mut_ptr() as *mut u8, data.len())
    };
    out
}

fn cold_pass() {
    let device = Device::Cpu;
    let (n, k, count) = (4096usize, 1024usize, 96usize);
    let x = Tensor::randn(0f32, 1.0, (1, k), &device).unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for dtype in [GgmlDType::Q4K, GgmlDType::Q8_0] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
        let mats: Vec<QMatMul> = (0..count)
            .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap())
            .collect();
        let qs: Vec<QTensor> = (0..count)
            .map(|_| QTensor::quantize(&w, dtype).unwrap())
            .collect();
        let bytes = qs[0].storage_size_in_bytes() as f64 * count as f64;
        let t_q = time(|| {
            for m in &mats {
                m.forward(&x).unwrap();
            }
        });
        let mut dst = vec![0f32; n];
        let t_c = if dtype == GgmlDType::Q4K {
            let blocks: Vec<Vec<BlockQ4K>> = qs.iter().map(compact::<BlockQ4K>).collect();
            time(|| {
                for b in &blocks {
                    matmul((1, k, n), &xs, b, &mut dst).unwrap();
                }
            })
        } else {
            let blocks: Vec<Vec<BlockQ8_0>> = qs.iter().map(compact::<BlockQ8_0>).collect();
            time(|| {
                for b in &blocks {
                    matmul((1, k, n), &xs, b, &mut dst).unwrap();
                }
            })
        };
        println!(
            "cold {count}x {n}x{k} {dtype:?} ({:.0} MB): QMatMul {:6.2} ms ({:5.1} GB/s of file bytes)  compact {:6.2} ms ({:5.1} GB/s)",
            bytes / 1e6,
            t_q * 1e3,
            bytes / t_q / 1e9,
            t_c * 1e3,
            bytes / t_c / 1e9
        );
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("cold") {
        return cold_pass();
    }
    let device = Device::Cpu;
    for (n, k) in [(4096usize, 1024usize), (1024, 4096), (32000, 1024)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, k), &device).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.storage_size_in_bytes() as f64;
            let mm = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let t_q = time(|| {
                mm.forward(&x).unwrap();
            });
            let mut dst = vec![0f32; n];
            let t_c = match dtype {
                GgmlDType::Q8_0 => {
                    let b = compact::<BlockQ8_0>(&q);
                    time(|| matmul((1, k, n), &xs, &b, &mut dst).unwrap())
                }
                GgmlDType::Q4K => {
                    let b = compact::<BlockQ4K>(&q);
                    time(|| matmul((1, k, n), &xs, &b, &mut dst).unwrap())
                }
                _ => {
                    let b = compact::<BlockQ6K>(&q);
                    time(|| matmul((1, k, n), &xs, &b, &mut dst).unwrap())
                }
            };
            println!(
                "{n:>6}x{k:<5} {dtype:?}: QMatMul {:7.1} µs ({:5.1} GB/s)  compact {:7.1} µs ({:5.1} GB/s)",
                t_q * 1e6,
                bytes / t_q / 1e9,
                t_c * 1e6,
                bytes / t_c / 1e9
            );
        }
    }
}
