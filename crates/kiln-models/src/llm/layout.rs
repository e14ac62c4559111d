//! Where an LLM's tensors live in each file layout, as data: transformers'
//! names (the internal naming) and llama.cpp's GGUF names for the same tensors.

/// (transformers name, GGUF name); `{i}` is the layer number.
pub const GGUF_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    (
        "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_norm.weight",
    ),
    (
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
    ),
    (
        "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_q.weight",
    ),
    (
        "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_k.weight",
    ),
    (
        "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_v.weight",
    ),
    (
        "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_output.weight",
    ),
    (
        "model.layers.{i}.self_attn.q_proj.bias",
        "blk.{i}.attn_q.bias",
    ),
    (
        "model.layers.{i}.self_attn.k_proj.bias",
        "blk.{i}.attn_k.bias",
    ),
    (
        "model.layers.{i}.self_attn.v_proj.bias",
        "blk.{i}.attn_v.bias",
    ),
    (
        "model.layers.{i}.self_attn.q_norm.weight",
        "blk.{i}.attn_q_norm.weight",
    ),
    (
        "model.layers.{i}.self_attn.k_norm.weight",
        "blk.{i}.attn_k_norm.weight",
    ),
    (
        "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_gate.weight",
    ),
    (
        "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_up.weight",
    ),
    (
        "model.layers.{i}.mlp.down_proj.weight",
        "blk.{i}.ffn_down.weight",
    ),
];

/// The GGUF name of a transformers tensor name, if the layout has it.
pub fn gguf_name(transformers_name: &str) -> Option<String> {
    let parts: Vec<&str> = transformers_name.split('.').collect();
    GGUF_NAMES.iter().find_map(|(ours, theirs)| {
        let pattern: Vec<&str> = ours.split('.').collect();
        if pattern.len() != parts.len() {
            return None;
        }
        let mut layer = None;
        for (p, n) in pattern.iter().zip(&parts) {
            if *p == "{i}" {
                n.parse::<usize>().ok()?;
                layer = Some(*n);
            } else if p != n {
                return None;
            }
        }
        Some(match layer {
            Some(i) => theirs.replace("{i}", i),
            None => (*theirs).to_string(),
        })
    })
}

/// The row order that undoes llama.cpp's Q/K permutation for `llama`-architecture
/// GGUF files (its converter interleaves each head's rotary halves; transformers
/// keeps them as halves): row `i` of the result is stored row `order[i]`.
pub fn unpermute_rows(heads: usize, rows: usize) -> Vec<usize> {
    // convert_hf_to_gguf: w.reshape(heads, 2, half, in).swapaxes(1, 2): stored row
    // (h, j, s) — head h, pair j, half s — holds transformers row (h, s, j).
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                order[h * head_dim + s * half + j] = h * head_dim + j * 2 + s;
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_names_map_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(),
            Some("blk.12.attn_q.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("vision_tower.weight"), None);
    }

    #[test]
    fn unpermutation_inverts_the_converters_interleave() {
        // One head of dim 4: transformers rows [a0 a1 | b0 b1] are stored [a0 b0 a1 b1].
        assert_eq!(unpermute_rows(1, 4), vec![0, 2, 1, 3]);
        assert_eq!(unpermute_rows(2, 4), vec![0, 1, 2, 3]);
    }
}
