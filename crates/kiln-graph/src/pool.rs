//! 2-D max and average pooling over NCHW tensors, with ONNX's padding rules
//! (padding never wins a max; averages count it only when asked).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::elementwise::with_slice;
use crate::error::{GraphError, Result};

/// A pooling window's geometry; `pads` = [top, left, bottom, right].
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub pads: [usize; 4],
    pub out: [usize; 2],
    pub count_include_pad: bool,
}

/// Pool every plane of `x` (f32 or f64, computed in f64 for the latter).
pub fn pool2d(x: &Tensor, max: bool, window: &Window) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let x32 = match dtype {
        DType::F32 => x.clone(),
        DType::F64 | DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        other => {
            return Err(GraphError::op(
                "pool2d",
                format!("needs a float input, got {other:?}"),
            ));
        }
    };
    let [oh, ow] = window.out;
    let out = with_slice::<f32, _>(&x32, |data| {
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(plane, dst)| {
                let src = &data[plane * h * w..(plane + 1) * h * w];
                pool_plane(src, (h, w), dst, max, window);
            });
        out
    })?;
    Ok(Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu)?.to_dtype(dtype)?)
}

fn pool_plane(src: &[f32], (h, w): (usize, usize), dst: &mut [f32], max: bool, window: &Window) {
    let [kh, kw] = window.kernel;
    let [sh, sw] = window.strides;
    let [pt, pl, pb, pr] = window.pads;
    let [oh, ow] = window.out;
    for oy in 0..oh {
        let y0 = (oy * sh) as isize - pt as isize;
        for ox in 0..ow {
            let x0 = (ox * sw) as isize - pl as isize;
            let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
            let mut count = 0usize;
            for ky in 0..kh as isize {
                let y = y0 + ky;
                if y < 0 || y >= h as isize {
                    continue;
                }
                let row = &src[y as usize * w..(y as usize + 1) * w];
                for kx in 0..kw as isize {
                    let x = x0 + kx;
                    if x < 0 || x >= w as isize {
                        continue;
                    }
                    let v = row[x as usize];
                    if max {
                        if v > acc || v.is_nan() {
                            acc = v;
                        }
                    } else {
                        acc += v;
                    }
                    count += 1;
                }
            }
            dst[oy * ow + ox] = if max {
                acc
            } else {
                let divisor = if window.count_include_pad {
                    // The window clipped to the padded extent (torch and ONNX).
                    let y_end = (y0 + kh as isize).min((h + pb) as isize);
                    let x_end = (x0 + kw as isize).min((w + pr) as isize);
                    ((y_end - y0) * (x_end - x0)) as usize
                } else {
                    count
                };
                acc / divisor.max(1) as f32
            };
        }
    }
}
