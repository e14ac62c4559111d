//! Times Kiln's CPU activations and softmax against candle's on FLUX-sized tensors
//! (`cargo run --release -p kiln-engine --example activation_timing`).
use candle_core::{Device, Tensor};
use kiln_engine::activation as act;
fn time(name: &str, f: &dyn Fn()) {
    f();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        f();
    }
    println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 5.0);
}
fn main() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1024, 3072), &d).unwrap();
    time("gelu candle", &|| {
        x.gelu().unwrap();
    });
    time("gelu kiln", &|| {
        act::gelu_tanh(&x).unwrap();
    });
    time("gelu_erf candle", &|| {
        x.gelu_erf().unwrap();
    });
    time("gelu_erf kiln", &|| {
        act::gelu_erf(&x).unwrap();
    });
    time("silu candle", &|| {
        x.silu().unwrap();
    });
    time("silu kiln", &|| {
        act::silu(&x).unwrap();
    });
    let s = Tensor::randn(0f32, 1.0, (6, 1088, 1088), &d).unwrap();
    time("softmax candle", &|| {
        candle_nn::ops::softmax_last_dim(&s).unwrap();
    });
    time("softmax kiln", &|| {
        act::softmax_last_dim(&s).unwrap();
    });
}
