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

/// Pool every plane of `x` (float types are pooled in f32: a max is exact, an
/// average of an f64 input rounds to f32 precision).
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

/// The input range a window covers along one axis, clipped to the input, for
/// each output position; and the padded extent (for `count_include_pad`).
fn window_ranges(
    out: usize,
    kernel: usize,
    stride: usize,
    pad_before: usize,
    size: usize,
    pad_after: usize,
) -> Vec<(usize, usize, usize)> {
    (0..out)
        .map(|o| {
            let start = (o * stride) as isize - pad_before as isize;
            let end = start + kernel as isize;
            let lo = start.max(0) as usize;
            let hi = end.clamp(0, size as isize) as usize;
            let padded = (end.min((size + pad_after) as isize) - start) as usize;
            (lo, hi.max(lo), padded)
        })
        .collect()
}

fn pool_plane(src: &[f32], (h, w): (usize, usize), dst: &mut [f32], max: bool, window: &Window) {
    let [kh, kw] = window.kernel;
    let [sh, sw] = window.strides;
    let [pt, pl, pb, pr] = window.pads;
    let [oh, ow] = window.out;
    let rows = window_ranges(oh, kh, sh, pt, h, pb);
    let cols = window_ranges(ow, kw, sw, pl, w, pr);
    for (oy, &(y0, y1, ypad)) in rows.iter().enumerate() {
        let line = &mut dst[oy * ow..(oy + 1) * ow];
        for (slot, &(x0, x1, xpad)) in line.iter_mut().zip(&cols) {
            if max {
                let mut acc = f32::NEG_INFINITY;
                for y in y0..y1 {
                    for &v in &src[y * w + x0..y * w + x1] {
                        // NaN wins, as in torch and onnxruntime.
                        acc = if v > acc || v.is_nan() { v } else { acc };
                    }
                }
                *slot = acc;
            } else {
                let mut acc = 0f32;
                for y in y0..y1 {
                    acc += src[y * w + x0..y * w + x1].iter().sum::<f32>();
                }
                let count = if window.count_include_pad {
                    ypad * xpad
                } else {
                    (y1 - y0) * (x1 - x0)
                };
                *slot = acc / count.max(1) as f32;
            }
        }
    }
}
