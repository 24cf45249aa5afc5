"""Record llama.cpp's answers for the two real models into test fixtures.

Run with a Python that has llama-cpp-python (the peers venv), never with this package:

    /root/.cache/mistralrs-cli/peers/bin/python scripts/record_llamacpp.py [--cache DIR] [--only tokens|greedy]

Writes
  tests/fixtures/llamacpp_tokens.json  strings -> llama.cpp ids (add_bos per model, special=True),
                                       llama.cpp's detokenized text (BOS dropped), round-trip flag;
  tests/fixtures/llamacpp_greedy.json  raw prompts -> prompt ids and llama.cpp's pure greedy
                                       continuation with the top-5 logits at each step.
Deterministic: fixed corpus (seeded generator), 2 threads, argmax taken here from the logits.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
from pathlib import Path

import llama_cpp
import numpy as np

MODELS = {
    "smollm2": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "greedy_steps": 40},
    "gemma3": {"file": "gemma-3-270m-q4_k_m.gguf", "greedy_steps": 24},
}
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
N_THREADS = 2
N_CTX = 1024
SEED = 1234

HANDWRITTEN = [
    "", " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\t \n \t",
    "Hello", "Hello world", " Hello world", "Hello world ", "  Hello  world  ",
    "Hello, world! How are you today?", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, but we've seen what you'd do. 'Tis true.",
    "I'M SURE THEY'LL SAY IT'S FINE; WE'VE SEEN IT.", "don't won't can't shouldn't",
    "café naïve façade résumé Ångström jalapeño Zürich", "e\u0301 a\u0300 o\u0308 (combining marks)",
    "Ça va? Où est la bibliothèque? Très bien.", "Straße, Größe, Mädchen, Äpfel",
    "😀", "👍🏽 thumbs up", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇺🇸🇯🇵🇫🇷🇩🇪 flags", "1️⃣ 2️⃣ keycaps",
    "I ❤️ 🍕 and 🍣!", "🤖🧠💡🚀✨🔥", "👩🏾‍💻 writes code", "🧑‍🤝‍🧑", "☃ ☂ ☀ ★ ♠ ♣ ♥ ♦",
    "你好，世界！", "漢字と仮名のテスト", "こんにちは、世界！カタカナもひらがなも。", "今日はいい天気ですね。",
    "안녕하세요, 세계! 한국어 테스트입니다.", "مرحبا بالعالم! كيف حالك؟", "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं?", "สวัสดีชาวโลก ภาษาไทย", "Привет, мир! Как дела?",
    "Γειά σου Κόσμε! Ελληνικά.", "Xin chào thế giới! Tiếng Việt có dấu.", "გამარჯობა მსოფლიო",
    "Բարեւ աշխարհ", "ሰላም ልዑል", "வணக்கம் உலகம்", "ওহে বিশ্ব", "Mixed: English, 中文, العربية, עברית, हिन्दी.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "const f = async (x) => { await fetch(`/api/${x}`); return x ?? null; };",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<!DOCTYPE html>\n<html><body><div class=\"x\"><p>Hi</p></div></body></html>",
    "<table><tr><td>1</td><td>2</td></tr></table>", "<b>bold</b> <i>it</i> <code>x</code> <h1>T</h1>",
    "#!/bin/bash\nfor f in *.txt; do echo \"$f\" | grep -v '^#' >> out.log; done\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "public static void main(String[] args) { System.out.println(\"Hello\"); }",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares", "λx. x + 1 ∀ε>0 ∃δ>0: |x−y|<δ ⇒ |f(x)−f(y)|<ε",
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "nested": {"k": null, "t": true}}',
    '[{"id":1,"v":-2.5e-3},{"id":2,"v":"\\u00e9\\n"}]', "key: value\nlist:\n  - one\n  - two\n",
    "# Title\n\n## Subtitle\n\n- item 1\n- item 2\n\n**bold** _it_ `code`\n",
    "| a | b |\n|---|---|\n| 1 | 2 |\n", "```python\nprint('hi')\n```\n", "> quote\n>> nested",
    "https://example.com/path/to/page?query=1&lang=en#section", "http://localhost:8080/v1/chat/completions",
    "mailto:someone@example.org", "user.name+tag@sub.domain.co.uk", "C:\\Users\\Admin\\Documents\\file.txt",
    "/usr/local/bin/python3.11", "~/.cache/mistralrs-cli/models/", "ftp://ftp.example.com/pub/file.tar.gz",
    "0", "7", "12", "123", "1234", "12345", "123456789", "12345678901234567890123456789",
    "3.14159265358979", "1,000,000", "-42", "+7", "1e-10", "6.022e23", "0x1F 0b1010 0o777",
    "２０２４年", "٠١٢٣٤٥٦٧٨٩", "½ ¼ ¾ ² ³", "Ⅻ Ⅳ ⅷ", "Phone: +1 (555) 123-4567", "Version 2.0.1-beta+build.5",
    "2024-01-15T10:30:00Z", "$19.99 €5,00 £3 ¥1000 ₹500", "100% of 50% is 25%",
    "!!!", "...", "?!?!?!", "---", "***", "~~~", "((()))", "[[{{<<>>}}]]", ";;;:::,,,", "@#$%^&*",
    "«quotes» „German“ “smart” ‘single’", "em—dash en–dash … ellipsis", "a.b.c.d", "well,well,well",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>system\nYou are helpful.<|im_end|>",
    "<|im_start|>user", "<|im_end|>", "<|endoftext|>", "text<|endoftext|>more", "<|im_start", "im_start|>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn>model\n",
    "<end_of_turn>", "<bos>", "<eos>", "<bos>Hello", "<pad><unk><mask>", "<s>", "</s>", "<unused0>",
    "[multimodal]", "<start_of_image>", "<start_of_turn", "<<start_of_turn>>", "<|im_start|><|im_start|>",
    "<repo_name>x<file_sep>y", "< bos >",
    "a\u200bb", "\ufeffBOM at start", "non\u00a0breaking\u00a0space", "ideographic\u3000space",
    "line\u2028separator", "soft\u00adhyphen", "\x07bell \x1b[31mred\x1b[0m", "tab\tseparated\tvalues",
    "null\x00byte", "\r", "\r\r\n\n", "   leading", "trailing   ", "\n\nleading newlines",
    "trailing newlines\n\n", "a  b", "a   b", "a    b", "a\t\tb", "a\n\nb", "a \n b",
    "Pneumonoultramicroscopicsilicovolcanoconiosis", "Supercalifragilisticexpialidocious" * 4,
    "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababababababababababababababababababababababababab", "ZZZZZZZZZZZZZZZZZZZZZZZZZ",
    "The year 1999 had 365 days; 2000 had 366.", "Call me at 5551234 or 555-1234.",
    "UPPER lower MiXeD cAsE", "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "Ünïcödé Téxt wïth Díäcrïtïcs", "ﬁ ﬂ ligatures", "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "ℌ𝔢𝔩𝔩𝔬 𝕄𝕒𝕥𝕙 𝓢𝓬𝓻𝓲𝓹𝓽",
    "The end.",
]

POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \t\n.,;:!?'\"()[]{}<>-_=+/*&^%$#@~`|\\"
    "éèêëàâäôöûüçñßøåÆŒ€£¥©®°±µ¶·×÷αβγδεζηθλμπσφψωАБВГДежзийклмнопрстуфхцчшщъыьэюя"
    "中文字漢語日本語ひらがなカタカナ한국어عربيעבריתहिन्दीไทย😀👍🏽🇫🇷❤️✨🚀‍️"
)


def corpus() -> list[str]:
    """Handwritten cases, whitespace/number sweeps and seeded random mixes (deterministic)."""
    out = list(HANDWRITTEN)
    for n in (1, 2, 3, 4, 5, 8, 16, 31, 32, 33, 40):
        out.append(" " * n)
        out.append("x" + " " * n + "y")
    for n in (2, 3, 5, 31, 33):
        out += ["\n" * n, "\t" * n, "a" + "\n" * n + "b"]
    out += [" \t" * 5, "\n \n \n", " \r\n \r\n", "\t\n\t\n"]
    for n in (1, 2, 3, 4, 5, 6, 7, 10, 15, 20, 40):
        out.append("".join(str((i * 7 + 3) % 10) for i in range(n)))
    rng = random.Random(SEED)
    for _ in range(60):
        k = rng.choice((3, 8, 20, 50, 120))
        out.append("".join(rng.choice(POOL) for _ in range(k)))
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def model_path(cache: Path, name: str) -> Path:
    path = cache / MODELS[name]["file"]
    if not path.exists():
        raise SystemExit(f"missing {path}: run scripts/fetch_models.py first")
    return path


def add_bos_of(llm: llama_cpp.Llama) -> bool:
    return bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))


def detokenize(llm: llama_cpp.Llama, ids: list[int]) -> bytes:
    """llama_detokenize with specials rendered; the Python wrapper's 32-byte buffer truncates."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, cap, False, True)
    assert 0 <= n <= cap, n
    return buf.raw[:n]


def record_tokens(cache: Path) -> dict:
    texts = corpus()
    result = {"llama_cpp_python": llama_cpp.__version__, "texts": texts, "models": {}}
    for name in MODELS:
        llm = llama_cpp.Llama(str(model_path(cache, name)), vocab_only=True, verbose=False)
        add_bos = add_bos_of(llm)
        bos = llm.token_bos()
        rows = []
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            body = ids[1:] if add_bos and ids and ids[0] == bos else ids
            raw = detokenize(llm, body)
            rows.append({"ids": ids, "detok": raw.decode("utf-8", "replace"),
                         "roundtrip": raw == text.encode()})
        result["models"][name] = {"file": MODELS[name]["file"], "add_bos": add_bos, "bos": bos,
                                  "cases": rows}
        print(f"{name}: {len(texts)} strings, {sum(r['roundtrip'] for r in rows)} round-trip")
    return result


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "Q: What is 12 times 7?\nA:",
    "The three primary colors are",
    "import numpy as np\n\n# Compute the mean of",
    "Translate to French: Good morning, how are you?\nFrench:",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nName three fruits.<end_of_turn>\n<start_of_turn>model\n",
    "1, 2, 3, 4, 5,",
    "Water boils at a temperature of",
    "{\"name\": \"Alice\", \"age\":",
    "Les chats sont",
    "The mitochondria is the",
]


def greedy(llm: llama_cpp.Llama, ids: list[int], steps: int) -> list[dict]:
    """Pure greedy decoding: argmax of llama.cpp's last-position logits, EOS not special."""
    llm.reset()
    llm.eval(ids)
    n_vocab = llm.n_vocab()
    out = []
    for _ in range(steps):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
        top = np.argsort(-logits, kind="stable")[:5]
        tok = int(np.argmax(logits))
        out.append({"id": tok, "top5": [[int(i), float(logits[i])] for i in top]})
        llm.eval([tok])
    return out


def record_greedy(cache: Path) -> dict:
    result = {"llama_cpp_python": llama_cpp.__version__, "n_threads": N_THREADS, "n_ctx": N_CTX,
              "seed": SEED, "models": {}}
    for name, spec in MODELS.items():
        llm = llama_cpp.Llama(str(model_path(cache, name)), n_ctx=N_CTX, n_threads=N_THREADS,
                              n_threads_batch=N_THREADS, seed=SEED, verbose=False)
        add_bos = add_bos_of(llm)
        runs = []
        for prompt in PROMPTS:
            ids = llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
            runs.append({"prompt": prompt, "prompt_ids": ids,
                         "steps": greedy(llm, ids, spec["greedy_steps"])})
        result["models"][name] = {"file": spec["file"], "add_bos": add_bos, "runs": runs}
        print(f"{name}: {len(runs)} greedy runs")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli"
    ap.add_argument("--cache", type=Path, default=Path(root) / "models")
    ap.add_argument("--only", choices=("tokens", "greedy"))
    args = ap.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    jobs = {"tokens": record_tokens, "greedy": record_greedy}
    for kind, fn in jobs.items():
        if args.only in (None, kind):
            data = fn(args.cache)
            path = FIXTURES / f"llamacpp_{kind}.json"
            path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
            print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
