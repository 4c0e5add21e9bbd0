//! A model split by its blocks: a [`Stage`] holds blocks `start..end` of a llama model, with
//! the token embedding when it starts at block 0 and the final norm and head when it ends
//! at the last block, and loads nothing else of the file. A generation flows through the
//! stages of a chain in block order: the first takes token ids, each passes its hidden
//! states (`[1, tokens, hidden]`, f32) to the next, the last gives the logits of the last
//! token. The attention cache is not in the weights but in a [`StageCache`] per session, so
//! one loaded stage serves many sessions and a session can be replayed elsewhere.
//!
//! The arithmetic is candle's `quantized_llama` step for step (the same kernels in the same
//! order), so a model cut anywhere gives the logits of the whole model: the tests compare
//! them with candle's own `ModelWeights`.

use crate::{InferError, metadata_string, metadata_u32, with_fast_kernel};
use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

/// The longest sequence a stage keeps rotary tables for (candle's `MAX_SEQ_LEN`).
const MAX_POSITIONS: usize = 4096;

/// Blocks `start..end` of a model (written `START-LAST`, both included, as `0-14`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRange {
    pub start: usize,
    pub end: usize,
}

impl BlockRange {
    pub fn new(start: usize, end: usize) -> Result<Self, String> {
        if start >= end {
            return Err(format!("blocks {start}..{end} hold no block"));
        }
        Ok(Self { start, end })
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn as_range(&self) -> Range<usize> {
        self.start..self.end
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end - 1)
    }
}

impl FromStr for BlockRange {
    type Err = String;

    /// `START-LAST`, both included (`0-14` is the first fifteen blocks).
    fn from_str(s: &str) -> Result<Self, String> {
        let (first, last) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a block range; write FIRST-LAST, as 0-14"))?;
        let number = |n: &str| {
            n.trim()
                .parse::<usize>()
                .map_err(|_| format!("{n:?} in {s:?} is not a block number"))
        };
        let (first, last) = (number(first)?, number(last)?);
        if last < first {
            return Err(format!("{s:?}: the last block comes before the first"));
        }
        Self::new(first, last + 1)
    }
}

/// What a stage is given: token ids (the first stage) or the hidden states the stage
/// before it produced.
pub enum StageInput {
    Tokens(Vec<u32>),
    Hidden(Tensor),
}

/// What a stage gives: hidden states for the next stage, or (the last stage) the logits of
/// the last position, `[vocabulary]`.
pub enum StageOutput {
    Hidden(Tensor),
    Logits(Tensor),
}

/// One session's attention cache at one stage: a key and value tensor per block, and how
/// many positions they hold.
pub struct StageCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    positions: usize,
}

impl StageCache {
    /// Positions already processed (the next input starts there).
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> usize {
        self.kv
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

struct Block {
    attention_q: QMatMul,
    attention_k: QMatMul,
    attention_v: QMatMul,
    attention_output: QMatMul,
    attention_norm: RmsNorm,
    ffn_gate: QMatMul,
    ffn_down: QMatMul,
    ffn_up: QMatMul,
    ffn_norm: RmsNorm,
}

struct Head {
    norm: RmsNorm,
    output: QMatMul,
}

/// Blocks `blocks` of a llama model, loaded from its GGUF file.
pub struct Stage {
    blocks: BlockRange,
    block_count: usize,
    hidden: usize,
    head_count: usize,
    kv_head_count: usize,
    head_dim: usize,
    embedding: Option<candle_nn::Embedding>,
    layers: Vec<Block>,
    head: Option<Head>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Shapes a model's metadata gives, for one stage.
struct Shape {
    block_count: usize,
    hidden: usize,
    head_count: usize,
    kv_head_count: usize,
    rope_dim: usize,
    rope_base: f32,
    rms_eps: f64,
}

impl Shape {
    fn read(content: &gguf_file::Content) -> Result<Self, InferError> {
        let arch = metadata_string(content, "general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(InferError::Unsupported(format!(
                "architecture {arch:?}; drover splits llama models"
            )));
        }
        let u32_of = |key: &'static str| {
            metadata_u32(content, key)
                .map(|v| v as usize)
                .ok_or(InferError::Missing(key))
        };
        let f32_of = |key: &str| content.metadata.get(key).and_then(|v| v.to_f32().ok());
        Ok(Self {
            block_count: u32_of("llama.block_count")?,
            hidden: u32_of("llama.embedding_length")?,
            head_count: u32_of("llama.attention.head_count")?,
            kv_head_count: u32_of("llama.attention.head_count_kv")?,
            rope_dim: u32_of("llama.rope.dimension_count")?,
            rope_base: f32_of("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: f32_of("llama.attention.layer_norm_rms_epsilon").ok_or(InferError::Missing(
                "llama.attention.layer_norm_rms_epsilon",
            ))? as f64,
        })
    }
}

fn read_shape(path: &Path) -> Result<Shape, InferError> {
    let mut file = open(path)?;
    Shape::read(&read_content(path, &mut file)?)
}

/// Blocks in a model file, read from its metadata alone.
pub fn block_count(path: &Path) -> Result<usize, InferError> {
    Ok(read_shape(path)?.block_count)
}

/// Values per token of a hidden state, read from the model's metadata alone.
pub fn hidden_size(path: &Path) -> Result<usize, InferError> {
    Ok(read_shape(path)?.hidden)
}

fn open(path: &Path) -> Result<std::fs::File, InferError> {
    std::fs::File::open(path).map_err(|source| InferError::Open {
        path: path.to_path_buf(),
        source,
    })
}

fn read_content(path: &Path, file: &mut std::fs::File) -> Result<gguf_file::Content, InferError> {
    gguf_file::Content::read(file).map_err(|e| InferError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Stage {
    /// Loads blocks `blocks` of the model at `path`, and the embedding or the head where the
    /// range needs them; nothing else of the file is read.
    pub fn load(path: &Path, blocks: BlockRange) -> Result<Self, InferError> {
        let mut file = open(path)?;
        let content = read_content(path, &mut file)?;
        Self::from_content(path, &content, &mut file, blocks)
    }

    /// [`Stage::load`] from a file whose header (`content`) is read already.
    pub(crate) fn from_content(
        path: &Path,
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        blocks: BlockRange,
    ) -> Result<Self, InferError> {
        let shape = Shape::read(content)?;
        if blocks.end > shape.block_count {
            return Err(InferError::Unsupported(format!(
                "blocks {blocks}: the model has {} blocks (0-{})",
                shape.block_count,
                shape.block_count - 1
            )));
        }
        let device = Device::Cpu;
        let format = |e: candle_core::Error| InferError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        // As `Model::load` does, so that a stage computes exactly what the whole model does.
        let mut tensor = |name: &str| -> Result<QTensor, InferError> {
            let t = content.tensor(file, name, &device).map_err(format)?;
            Ok(with_fast_kernel(t, &device)?)
        };
        let is_last = blocks.end == shape.block_count;
        let tied_head = !content.tensor_infos.contains_key("output.weight");
        let token_embedding = if blocks.start == 0 || (is_last && tied_head) {
            Some(tensor("token_embd.weight")?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(blocks.len());
        for b in blocks.as_range() {
            let mut weight = |part: &str| tensor(&format!("blk.{b}.{part}.weight"));
            let norm = |t: QTensor| RmsNorm::from_qtensor(t, shape.rms_eps);
            layers.push(Block {
                attention_q: QMatMul::from_qtensor(weight("attn_q")?)?,
                attention_k: QMatMul::from_qtensor(weight("attn_k")?)?,
                attention_v: QMatMul::from_qtensor(weight("attn_v")?)?,
                attention_output: QMatMul::from_qtensor(weight("attn_output")?)?,
                attention_norm: norm(weight("attn_norm")?)?,
                ffn_gate: QMatMul::from_qtensor(weight("ffn_gate")?)?,
                ffn_down: QMatMul::from_qtensor(weight("ffn_down")?)?,
                ffn_up: QMatMul::from_qtensor(weight("ffn_up")?)?,
                ffn_norm: norm(weight("ffn_norm")?)?,
            });
        }
        let embedding = match (blocks.start, &token_embedding) {
            (0, Some(t)) => Some(candle_nn::Embedding::new(
                t.dequantize(&device)?,
                shape.hidden,
            )),
            _ => None,
        };
        let head = if is_last {
            let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, shape.rms_eps)?;
            // Models without `output.weight` (SmolLM2) reuse the token embedding as head.
            let output = if content.tensor_infos.contains_key("output.weight") {
                tensor("output.weight")?
            } else {
                token_embedding.ok_or(InferError::Missing("token_embd.weight"))?
            };
            Some(Head {
                norm,
                output: QMatMul::from_qtensor(output)?,
            })
        } else {
            None
        };
        let (cos, sin) = rope_tables(shape.rope_dim, shape.rope_base, &device)?;
        Ok(Self {
            blocks,
            block_count: shape.block_count,
            hidden: shape.hidden,
            head_count: shape.head_count,
            kv_head_count: shape.kv_head_count,
            head_dim: shape.hidden / shape.head_count,
            embedding,
            layers,
            head,
            cos,
            sin,
            device,
        })
    }

    pub fn blocks(&self) -> BlockRange {
        self.blocks
    }

    /// Blocks of the whole model.
    pub fn block_count(&self) -> usize {
        self.block_count
    }

    /// Width of a hidden state (values per token).
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn is_first(&self) -> bool {
        self.blocks.start == 0
    }

    pub fn is_last(&self) -> bool {
        self.blocks.end == self.block_count
    }

    /// A new session's cache at this stage.
    pub fn new_cache(&self) -> StageCache {
        StageCache {
            kv: (0..self.layers.len()).map(|_| None).collect(),
            positions: 0,
        }
    }

    /// Runs the stage's blocks on `input`, the positions after those `cache` holds.
    pub fn forward(
        &self,
        cache: &mut StageCache,
        input: StageInput,
    ) -> Result<StageOutput, InferError> {
        let mut x = match (input, &self.embedding) {
            (StageInput::Tokens(ids), Some(embedding)) => {
                let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
                embedding.forward(&ids)?
            }
            (StageInput::Tokens(_), None) => {
                return Err(InferError::Unsupported(format!(
                    "blocks {} take hidden states, not tokens",
                    self.blocks
                )));
            }
            (StageInput::Hidden(h), _) => {
                let (batch, _, width) = h.dims3()?;
                if batch != 1 || width != self.hidden || h.dtype() != DType::F32 {
                    return Err(InferError::Unsupported(format!(
                        "hidden states of shape {:?} ({:?}); blocks {} take [1, tokens, {}] \
                         in f32",
                        h.dims(),
                        h.dtype(),
                        self.blocks,
                        self.hidden
                    )));
                }
                h
            }
        };
        let (_, seq_len, _) = x.dims3()?;
        let position = cache.positions;
        if position + seq_len > MAX_POSITIONS {
            return Err(InferError::PromptTooLong {
                tokens: position + seq_len,
                limit: MAX_POSITIONS,
            });
        }
        let mask = if seq_len == 1 {
            None
        } else {
            Some(candle_transformers::utils::build_causal_mask(
                seq_len,
                position,
                &self.device,
            )?)
        };
        for (block, kv) in self.layers.iter().zip(cache.kv.iter_mut()) {
            let residual = &x;
            let normed = block.attention_norm.forward(&x)?;
            let attention = self.attention(block, kv, &normed, mask.as_ref(), position)?;
            let x1 = (attention + residual)?;
            let residual = &x1;
            let normed = block.ffn_norm.forward(&x1)?;
            let gate = block.ffn_gate.forward(&normed)?;
            let up = block.ffn_up.forward(&normed)?;
            let mlp = block
                .ffn_down
                .forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (mlp + residual)?;
        }
        cache.positions += seq_len;
        match &self.head {
            None => Ok(StageOutput::Hidden(x)),
            Some(head) => {
                let x = head.norm.forward(&x)?;
                let last = x.i((.., seq_len - 1, ..))?;
                Ok(StageOutput::Logits(head.output.forward(&last)?.squeeze(0)?))
            }
        }
    }

    fn attention(
        &self,
        block: &Block,
        kv: &mut Option<(Tensor, Tensor)>,
        x: &Tensor,
        mask: Option<&Tensor>,
        position: usize,
    ) -> Result<Tensor, InferError> {
        let (batch, seq_len, width) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((batch, seq_len, n, self.head_dim))?
                .transpose(1, 2)
        };
        let q = heads(block.attention_q.forward(x)?, self.head_count)?;
        let k = heads(block.attention_k.forward(x)?, self.kv_head_count)?;
        let v = heads(block.attention_v.forward(x)?, self.kv_head_count)?.contiguous()?;
        let q = self.rotate(&q, position)?;
        let k = self.rotate(&k, position)?;
        let (k, v) = match kv.take() {
            Some((k_cache, v_cache)) if position > 0 => (
                Tensor::cat(&[&k_cache, &k], 2)?,
                Tensor::cat(&[&v_cache, &v], 2)?,
            ),
            _ => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let repeats = self.head_count / self.kv_head_count;
        let k = candle_transformers::utils::repeat_kv(k, repeats)?;
        let v = candle_transformers::utils::repeat_kv(v, repeats)?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let scores = match mask {
            None => scores,
            Some(mask) => {
                let mask = mask.broadcast_as(scores.shape())?;
                let neg_inf = Tensor::new(f32::NEG_INFINITY, &self.device)?
                    .broadcast_as(scores.shape().dims())?;
                mask.where_cond(&neg_inf, &scores)?
            }
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = weights.matmul(&v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape(&[batch, seq_len, width])?;
        Ok(block.attention_output.forward(&y)?)
    }

    fn rotate(&self, x: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        let (_, _, seq_len, _) = x.dims4()?;
        let cos = self.cos.narrow(0, position, seq_len)?;
        let sin = self.sin.narrow(0, position, seq_len)?;
        // llama GGUF files keep the interleaved rotary layout.
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }
}

/// The rotary tables, as candle's `precomput_freqs_cis`.
fn rope_tables(dim: usize, base: f32, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let angles = Tensor::arange(0, MAX_POSITIONS as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_POSITIONS, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// The wire format of hidden states between stages: `DRHS`, a format version (1), the
/// element type (0: f32, 1: f16), the number of dimensions, each dimension as a u32, then
/// the values; every number little-endian. f16 halves the bytes on the wire for a small
/// loss of precision; f32 keeps a split model's output equal to the whole model's.
pub mod wire {
    use super::InferError;
    use candle_core::{DType, Device, Tensor};

    const MAGIC: &[u8; 4] = b"DRHS";
    const VERSION: u8 = 1;

    /// Element types on the wire.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum WireType {
        F32,
        F16,
    }

    fn bad(message: impl Into<String>) -> InferError {
        InferError::Unsupported(format!("hidden states: {}", message.into()))
    }

    /// Encodes `tensor` as `dtype`.
    pub fn encode(tensor: &Tensor, dtype: WireType) -> Result<Vec<u8>, InferError> {
        let dims = tensor.dims();
        let values = tensor.flatten_all()?;
        let mut out = Vec::with_capacity(8 + 4 * dims.len() + 4 * values.elem_count());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(match dtype {
            WireType::F32 => 0,
            WireType::F16 => 1,
        });
        out.push(u8::try_from(dims.len()).map_err(|_| bad("too many dimensions"))?);
        out.push(0);
        for &d in dims {
            out.extend_from_slice(
                &u32::try_from(d)
                    .map_err(|_| bad("a dimension over u32"))?
                    .to_le_bytes(),
            );
        }
        match dtype {
            WireType::F32 => {
                for v in values.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            WireType::F16 => {
                for v in values.to_dtype(DType::F16)?.to_vec1::<half::f16>()? {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Decodes what [`encode`] wrote, as f32 on `device`; refuses anything else.
    pub fn decode(bytes: &[u8], device: &Device) -> Result<Tensor, InferError> {
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(bad("not drover hidden states (no DRHS header)"));
        }
        if bytes[4] != VERSION {
            return Err(bad(format!(
                "format version {} (this node reads 1)",
                bytes[4]
            )));
        }
        let width = match bytes[5] {
            0 => 4,
            1 => 2,
            t => return Err(bad(format!("element type {t}"))),
        };
        let ndims = bytes[6] as usize;
        let header = 8 + 4 * ndims;
        if bytes.len() < header {
            return Err(bad("truncated header"));
        }
        let dims: Vec<usize> = bytes[8..header]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let count = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad("shape too large"))?;
        let body = &bytes[header..];
        if Some(body.len()) != count.checked_mul(width) {
            return Err(bad(format!(
                "{} bytes of values for shape {dims:?} ({} expected)",
                body.len(),
                count.saturating_mul(width)
            )));
        }
        let values: Vec<f32> = if width == 4 {
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            body.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        Ok(Tensor::from_vec(values, dims, device)?)
    }
}

/// The logits' largest entry: greedy decoding.
pub fn argmax(logits: &Tensor) -> Result<u32, InferError> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ranges_are_first_dash_last() {
        let r: BlockRange = "0-14".parse().unwrap();
        assert_eq!((r.start, r.end, r.len()), (0, 15, 15));
        assert_eq!(r.to_string(), "0-14");
        assert_eq!("7-7".parse::<BlockRange>().unwrap().len(), 1);
        for bad in ["14-0", "0", "a-3", "-1-2", "3-"] {
            assert!(bad.parse::<BlockRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hidden_states_round_trip_and_bad_bytes_are_refused() {
        let device = Device::Cpu;
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
        let t = Tensor::from_vec(values.clone(), (1, 4, 6), &device).unwrap();
        let bytes = wire::encode(&t, wire::WireType::F32).unwrap();
        assert_eq!(bytes.len(), 8 + 3 * 4 + 24 * 4);
        let back = wire::decode(&bytes, &device).unwrap();
        assert_eq!(back.dims(), &[1, 4, 6]);
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );

        let half = wire::encode(&t, wire::WireType::F16).unwrap();
        assert_eq!(half.len(), 8 + 3 * 4 + 24 * 2);
        let back = wire::decode(&half, &device).unwrap();
        for (a, b) in back
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(&values)
        {
            assert!((a - b).abs() < 1e-2, "{a} vs {b}");
        }

        assert!(wire::decode(b"nope", &device).is_err());
        assert!(wire::decode(&bytes[..bytes.len() - 1], &device).is_err());
        let mut wrong_version = bytes.clone();
        wrong_version[4] = 9;
        assert!(wire::decode(&wrong_version, &device).is_err());
    }
}
