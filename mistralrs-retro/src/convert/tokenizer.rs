//! GGUF `tokenizer.ggml.*` (model "gpt2": byte-level BPE) → a `tokenizers` Tokenizer.

use std::collections::HashMap;

use anyhow::{anyhow, bail, ensure, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TokenizerBuilder,
};

use super::metadata::Metadata;

/// llama.cpp's `llama_token_type` values that matter here.
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer as the GGUF describes it.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`; only "gpt2" (byte-level BPE) is converted.
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer regex set.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// Empty when the GGUF has no `tokenizer.ggml.token_type`.
    pub token_types: Vec<i32>,
    /// "left right" pairs, highest priority first.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl GgufVocab {
    pub(crate) fn from_metadata(md: &Metadata) -> Result<Self> {
        let tokens = md
            .opt_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| anyhow!("GGUF has no tokenizer.ggml.tokens"))?;
        let token_types = md
            .opt_i32_array("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        ensure!(
            token_types.is_empty() || token_types.len() == tokens.len(),
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            token_types.len(),
            tokens.len()
        );
        let vocab = Self {
            model: md.str("tokenizer.ggml.model")?.to_string(),
            pre: md.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            merges: md
                .opt_str_array("tokenizer.ggml.merges")?
                .unwrap_or_default(),
            bos: md.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: md.opt_u32("tokenizer.ggml.eos_token_id")?,
            unk: md.opt_u32("tokenizer.ggml.unknown_token_id")?,
            pad: md.opt_u32("tokenizer.ggml.padding_token_id")?,
            // llama.cpp's defaults for BPE vocabularies.
            add_bos: md
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            add_eos: md
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            tokens,
            token_types,
        };
        for (key, id) in [
            ("bos", vocab.bos),
            ("eos", vocab.eos),
            ("unknown", vocab.unk),
            ("padding", vocab.pad),
        ] {
            if let Some(id) = id {
                ensure!(
                    (id as usize) < vocab.tokens.len(),
                    "tokenizer.ggml.{key}_token_id {id} is outside the {}-token vocabulary",
                    vocab.tokens.len()
                );
            }
        }
        Ok(vocab)
    }

    /// Tokens that must be matched whole before BPE runs, with whether each is special.
    /// Control and unknown tokens are special, user-defined ones are not; the named
    /// bos/eos/unk/pad tokens are special even when the GGUF lacks token types.
    pub fn added_token_ids(&self) -> impl Iterator<Item = (u32, bool)> + '_ {
        let named = [self.bos, self.eos, self.unk, self.pad];
        (0..self.tokens.len() as u32).filter_map(move |id| {
            let ty = self.token_types.get(id as usize).copied();
            let special = matches!(ty, Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN))
                || named.contains(&Some(id));
            if special {
                Some((id, true))
            } else if ty == Some(TOKEN_TYPE_USER_DEFINED) {
                Some((id, false))
            } else {
                None
            }
        })
    }
}

/// How llama.cpp splits text before BPE for a given `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreSplit {
    /// The GPT-2 regex alone.
    Gpt2,
    /// Every `\p{N}` char on its own first, then the GPT-2 regex (StarCoder lineage).
    DigitsThenGpt2,
    /// One regex of the Llama-3 / Qwen2 family, then byte-level mapping without the GPT-2 regex.
    Regex(&'static str),
}

/// The split shared by Llama 3 and Qwen2 (they differ in digit runs): case-insensitive
/// contractions, letters with one leading non-letter, digits, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama 3 but every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Returns the split and, for pre-tokenizers only approximated here, a warning.
fn pre_split(pre: Option<&str>) -> (PreSplit, Option<String>) {
    match pre {
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b",
        ) => (PreSplit::DigitsThenGpt2, None),
        Some("gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion") => (PreSplit::Gpt2, None),
        Some("qwen2" | "deepseek-r1-qwen") => (PreSplit::Regex(QWEN2_SPLIT), None),
        Some("llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral") => (PreSplit::Regex(LLAMA3_SPLIT), None),
        other => (
            PreSplit::Gpt2,
            Some(format!(
                "tokenizer.ggml.pre {other:?} is approximated by the GPT-2 split; \
                 encodings may differ from llama.cpp"
            )),
        ),
    }
}

pub struct BuiltTokenizer {
    pub tokenizer: Tokenizer,
    pub warnings: Vec<String>,
}

/// Builds a byte-level BPE tokenizer equivalent to llama.cpp's for this vocabulary.
pub fn build_tokenizer(v: &GgufVocab) -> Result<BuiltTokenizer> {
    if v.model != "gpt2" {
        bail!(
            "tokenizer.ggml.model {:?} is not supported: only \"gpt2\" (byte-level BPE) is converted",
            v.model
        );
    }
    let mut warnings = Vec::new();

    let mut vocab = Vocab::default();
    for (id, token) in v.tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.clone(), id as u32) {
            // Keep the lower id, as llama.cpp's text→id map does.
            vocab.insert(token.clone(), first);
            warnings.push(format!(
                "token {token:?} appears at ids {first} and {id}; using {first}"
            ));
        }
    }
    let merges: Merges = v
        .merges
        .iter()
        .map(|m| {
            // Byte-level tokens never contain a literal space, so the first one separates.
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("malformed merge {m:?}: expected \"left right\""))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("building BPE model: {e}"))?;

    let (split, warning) = pre_split(v.pre.as_deref());
    warnings.extend(warning);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match split {
        PreSplit::Gpt2 => byte_level.into(),
        PreSplit::DigitsThenGpt2 => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        PreSplit::Regex(pattern) => {
            let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?;
            PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    };

    let mut tokenizer: Tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(bpe.into())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(pre_tokenizer))
    .with_post_processor(Some(post_processor(v)?))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .map_err(|e| anyhow!("assembling tokenizer: {e}"))?
    .into();

    let (special, plain): (Vec<_>, Vec<_>) = v.added_token_ids().partition(|&(_, special)| special);
    let added = |ids: Vec<(u32, bool)>, special: bool| -> Vec<AddedToken> {
        ids.into_iter()
            .map(|(id, _)| {
                AddedToken::from(v.tokens[id as usize].clone(), special).normalized(false)
            })
            .collect()
    };
    tokenizer.add_special_tokens(&added(special, true));
    tokenizer.add_tokens(&added(plain, false));

    // Added tokens must keep their GGUF ids; a new id would mean the vocab is inconsistent.
    for (id, _) in v.added_token_ids() {
        let token = &v.tokens[id as usize];
        let got = tokenizer.token_to_id(token);
        ensure!(
            got == Some(id) || got.is_some_and(|g| v.tokens[g as usize] == *token),
            "added token {token:?} got id {got:?} instead of {id}"
        );
    }
    Ok(BuiltTokenizer {
        tokenizer,
        warnings,
    })
}

/// ByteLevel keeps offsets as transformers' GPT-2 conversion does; BOS/EOS are added
/// by a template only when the GGUF asks for them.
fn post_processor(v: &GgufVocab) -> Result<PostProcessorWrapper> {
    let byte_level: PostProcessorWrapper = ByteLevel::new(true, false, true).into();
    let mut prefix = Vec::new();
    let mut suffix = Vec::new();
    let mut special_tokens = HashMap::new();
    for (wanted, id, sink) in [
        (v.add_bos, v.bos, &mut prefix),
        (v.add_eos, v.eos, &mut suffix),
    ] {
        let (true, Some(id)) = (wanted, id) else {
            continue;
        };
        let token = v.tokens[id as usize].clone();
        ensure!(
            !token.contains(char::is_whitespace) && !token.contains(':') && !token.starts_with('$'),
            "cannot express {token:?} in a TemplateProcessing template"
        );
        special_tokens.insert(token.clone(), id);
        sink.push(token);
    }
    if prefix.is_empty() && suffix.is_empty() {
        return Ok(byte_level);
    }
    let template = |seq: &str| -> String {
        prefix
            .iter()
            .chain([&format!("${seq}")])
            .chain(suffix.iter())
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let single = template("A");
    let pair = format!("{single} {}", template("B:1"));
    let template = TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| anyhow!("BOS/EOS template {single:?}: {e}"))?
        .try_pair(pair.as_str())
        .map_err(|e| anyhow!("BOS/EOS template {pair:?}: {e}"))?
        .special_tokens(special_tokens.into_iter().collect::<Vec<(String, u32)>>())
        .build()
        .map_err(|e| anyhow!("BOS/EOS template: {e}"))?;
    Ok(PostProcessorSequence::new(vec![byte_level, template.into()]).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte-level char as a base token, then a handful of merges, then `<|endoftext|>`
    /// as a control token.
    fn tiny_vocab(pre: &str) -> GgufVocab {
        let mut tokens: Vec<String> = {
            let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
            alphabet.sort_unstable();
            alphabet.into_iter().map(String::from).collect()
        };
        let merges = [
            "H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
        ];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        tokens.push("<|endoftext|>".into());
        let mut token_types = vec![1; tokens.len()];
        *token_types.last_mut().unwrap() = TOKEN_TYPE_CONTROL;
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            eos: Some(tokens.len() as u32 - 1),
            tokens,
            token_types,
            merges: merges.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn hello_world_round_trips() {
        let v = tiny_vocab("smollm");
        let tok = build_tokenizer(&v).unwrap().tokenizer;
        let enc = tok.encode("Hello world", false).unwrap();
        assert_eq!(enc.get_tokens(), ["Hello", "Ġworld"]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "Hello world");
    }

    #[test]
    fn control_tokens_are_single_special_ids() {
        let v = tiny_vocab("smollm");
        let eos = v.eos.unwrap();
        let tok = build_tokenizer(&v).unwrap().tokenizer;
        let enc = tok.encode("Hello<|endoftext|> world", false).unwrap();
        assert_eq!(enc.get_ids()[1], eos);
        assert_eq!(enc.get_ids().len(), 3);
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "Hello world");
    }

    #[test]
    fn smollm_splits_digits_but_gpt2_does_not() {
        let digits = build_tokenizer(&tiny_vocab("smollm")).unwrap().tokenizer;
        assert_eq!(digits.encode("12", false).unwrap().get_tokens(), ["1", "2"]);
        let gpt2 = build_tokenizer(&tiny_vocab("gpt-2")).unwrap().tokenizer;
        assert_eq!(gpt2.encode("12", false).unwrap().get_tokens(), ["12"]);
    }

    #[test]
    fn qwen2_and_llama3_splits() {
        let qwen = build_tokenizer(&tiny_vocab("qwen2")).unwrap();
        assert!(qwen.warnings.is_empty(), "{:?}", qwen.warnings);
        let qwen = qwen.tokenizer;
        let enc = qwen.encode("Hello world", false).unwrap();
        assert_eq!(enc.get_tokens(), ["Hello", "Ġworld"]);
        assert_eq!(qwen.decode(enc.get_ids(), false).unwrap(), "Hello world");
        assert_eq!(qwen.encode("12", false).unwrap().get_tokens(), ["1", "2"]);
        let llama3 = build_tokenizer(&tiny_vocab("llama-bpe")).unwrap().tokenizer;
        assert_eq!(llama3.encode("12", false).unwrap().get_tokens(), ["12"]);
        // Two spaces before a word: the first stands alone (`\s+(?!\S)`), the second leads the word.
        assert_eq!(qwen.encode("Hello  world", false).unwrap().get_tokens(), ["Hello", "Ġ", "Ġworld"]);
    }

    #[test]
    fn add_bos_prepends_bos() {
        let mut v = tiny_vocab("smollm");
        v.bos = v.eos;
        v.add_bos = true;
        let tok = build_tokenizer(&v).unwrap().tokenizer;
        let ids = tok.encode("Hello", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, [v.bos.unwrap(), tok.token_to_id("Hello").unwrap()]);
        assert_eq!(tok.encode("Hello", false).unwrap().get_ids().len(), 1);
    }

    #[test]
    fn sentencepiece_gguf_is_refused() {
        let mut v = tiny_vocab("smollm");
        v.model = "llama".into();
        let err = build_tokenizer(&v).err().expect("must fail").to_string();
        assert!(err.contains("not supported"), "{err}");
    }
}
