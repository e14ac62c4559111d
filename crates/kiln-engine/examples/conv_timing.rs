//! Times Kiln's im2col conv2d against candle's on a VAE-sized layer.
use candle_core::{Device, Tensor};
fn main() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 128, 256, 256), &d).unwrap();
    let w = Tensor::randn(0f32, 0.05, (128, 128, 3, 3), &d).unwrap();
    let ours = || {
        kiln_engine::conv::conv2d_im2col(&x, &w, 1, 1).unwrap();
    };
    let candle = || {
        x.conv2d(&w, 1, 1, 1, 1).unwrap();
    };
    for (name, f) in [("kiln im2col", &ours as &dyn Fn()), ("candle", &candle)] {
        f();
        let t = std::time::Instant::now();
        for _ in 0..3 {
            f();
        }
        println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0 / 3.0);
    }
}
