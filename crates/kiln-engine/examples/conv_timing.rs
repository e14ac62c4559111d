//! Times Kiln's im2col conv2d against candle's on a VAE-sized layer, and the bare
//! GEMM of the same size (`cargo run --release -p kiln-engine --example conv_timing [kiln]`).
use candle_core::{Device, Tensor};
fn main() {
    kiln_engine::memory::tune_allocator();
    let only_kiln = std::env::args().nth(1).as_deref() == Some("kiln");
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 128, 256, 256), &d).unwrap();
    let w = Tensor::randn(0f32, 0.05, (128, 128, 3, 3), &d).unwrap();
    let a = w.reshape((128, 1152)).unwrap();
    let b = Tensor::randn(0f32, 1.0, (1152, 65536), &d).unwrap();
    let ours = || {
        kiln_engine::conv::conv2d_im2col(&x, &w, None, 1, 1).unwrap();
    };
    let candle = || {
        x.conv2d(&w, 1, 1, 1, 1).unwrap();
    };
    let gemm = || {
        a.matmul(&b).unwrap();
    };
    let mut cases: Vec<(&str, &dyn Fn())> = vec![("kiln im2col", &ours)];
    if !only_kiln {
        cases.push(("candle", &candle));
        cases.push(("bare GEMM 128x1152x65536", &gemm));
    }
    for (name, f) in cases {
        f();
        let t = std::time::Instant::now();
        for _ in 0..3 {
            f();
        }
        println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0 / 3.0);
    }
}
