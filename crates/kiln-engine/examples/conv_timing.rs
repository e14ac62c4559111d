//! Times Kiln's CPU convolution, with f32 and with bf16 products, on the
//! 3×3 layer shapes of SDXL's UNet (CFG batch of 2) and VAE decoder, in
//! ms and GFLOP/s (`cargo run --release -p kiln-engine --example conv_timing`;
//! `KILN_SIMD=avx2` shows the paths an AVX2 CPU takes).
use candle_core::{Device, Tensor};
use kiln_engine::conv::{PackedConv, Products, conv2d_cpu, conv2d_packed};

fn main() {
    kiln_engine::memory::tune_allocator();
    let device = Device::Cpu;
    println!("simd level: {}", kiln_engine::simd::level().name());
    // (batch, in, out, side)
    for (n, c, o, side) in [
        (2, 320, 320, 32),
        (2, 640, 640, 16),
        (2, 1280, 1280, 8),
        (1, 512, 512, 32),
        (1, 512, 512, 64),
        (1, 256, 256, 128),
        (1, 128, 128, 256),
        (1, 3, 32, 64),
    ] {
        let x = Tensor::randn(0f32, 1.0, (n, c, side, side), &device).unwrap();
        let w = Tensor::randn(0f32, 0.05, (o, c, 3, 3), &device).unwrap();
        let flops = 2.0 * (n * o * c * 9 * side * side) as f64;
        let mut line = format!("{n}x{c}->{o} {side}x{side}:");
        let f32_packed = PackedConv::pack(&w, Products::F32).unwrap();
        let bf16_packed = PackedConv::pack(&w, Products::Bf16).unwrap();
        let cases: [(&str, &dyn Fn() -> Tensor); 4] = [
            ("f32", &|| {
                conv2d_cpu(&x, &w, None, (1, 1), Products::F32).unwrap()
            }),
            ("f32 packed", &|| {
                conv2d_packed(&x, &f32_packed, None, 1).unwrap()
            }),
            ("bf16", &|| {
                conv2d_cpu(&x, &w, None, (1, 1), Products::Bf16).unwrap()
            }),
            ("bf16 packed", &|| {
                conv2d_packed(&x, &bf16_packed, None, 1).unwrap()
            }),
        ];
        for (name, run) in cases {
            if name.ends_with("packed") && kiln_engine::simd::level().name() != "avx512" {
                continue;
            }
            run();
            // The fastest of several runs: this VM's neighbours add noise.
            let runs = ((4e9 / flops) as usize).clamp(3, 50);
            let seconds = (0..runs)
                .map(|_| {
                    let t = std::time::Instant::now();
                    run();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            line += &format!(
                "  {name} {:.1} ms ({:.0})",
                seconds * 1e3,
                flops / seconds / 1e9
            );
        }
        println!("{line}");
    }
}
