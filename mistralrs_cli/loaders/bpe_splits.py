"""llama.cpp's byte-level BPE pre-tokenizers: the split regexes and vocab flags that a GGUF's
`tokenizer.ggml.pre` names (llama-vocab.cpp), for loaders/tokenizer.py's 'gpt2' vocabularies."""
from __future__ import annotations

from dataclasses import dataclass

# llama.cpp's split regexes (llama-vocab.cpp), applied in order; text between matches is kept.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_CJK = "[一-龥ࠀ-一가-퟿]+"
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# deepseek-llm's letter class, as code point ranges (escaped: several endpoints have canonical
# equivalents that text normalization would silently swap).
_DEEPSEEK_RANGES = (  # hex code points
    "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376-377 37B-37D 37F 386 "
    "388-38A 38C 38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD "
    "1C90-1CBA 1CBD-1CBF 1D00-1D2B 1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D "
    "1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 "
    "1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 2115 2119-211D 2124 2126 2128 "
    "212A-212D 212F-2134 2139 213C-213F 2145-2149 214E 2183-2184 2C00-2C7B 2C7E-2CE4 2CEB-2CEE "
    "2CF2-2CF3 A640-A66D A680-A69B A722-A76F A771-A787 A78B-A78E AB70-ABBF FB00-FB06 FB13-FB17 "
    "FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB 10C80-10CB2 10CC0-10CF2 "
    "118A0-118DF 1E900-1E943")
_DEEPSEEK_LETTERS = "".join("-".join(f"\\x{{{h}}}" for h in r.split("-"))
                            for r in _DEEPSEEK_RANGES.split())
SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "deepseek-llm": ("[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                     r"\s+$", _CJK, r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?"""
                    r"[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "bloom": (_BLOOM,),
    "viking": (_BLOOM, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
}


@dataclass(frozen=True)
class PreTokenizer:
    """One row of llama.cpp's `tokenizer.ggml.pre` table: which regexes, and its vocab flags."""
    splits: str
    ignore_merges: bool = False  # a word that is already a token is not merged (llama3 style)
    add_bos: bool = False        # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_PRE_NAMES: dict[PreTokenizer, tuple[str, ...]] = {
    PreTokenizer("default"): ("default",),
    PreTokenizer("llama3", ignore_merges=True, add_bos=True): (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "smaug-bpe", "dbrx"),
    PreTokenizer("gpt2"): ("gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais",
                           "gigachat", "exaone4", "mellum", "trillion", "roberta-bpe", "jina-v1-en"),
    PreTokenizer("starcoder"): ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                "exaone", "minerva-7b"),
    PreTokenizer("qwen2"): ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"),
    PreTokenizer("bloom"): ("bloom", "poro-chat", "gpt3-finnish"),
    PreTokenizer("llama3"): ("chatglm-bpe", "glm4"),
    PreTokenizer("gpt-4o"): ("gpt-4o", "llama4"),
    PreTokenizer("tekken", ignore_merges=True, add_bos=True): ("tekken",),
    PreTokenizer("default", add_bos=True): ("chameleon",),
    **{PreTokenizer(n): (n,) for n in ("falcon", "deepseek-llm", "deepseek-coder", "deepseek-v3",
                                       "viking")},
}
PRE_TOKENIZERS: dict[str, PreTokenizer] = {n: p for p, names in _PRE_NAMES.items() for n in names}
