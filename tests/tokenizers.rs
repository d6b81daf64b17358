//! Real tokenizer files give the ids their reference readers give: the ids recorded with the
//! llama2 and gpt2 assets, and transformers' ids for all four in
//! tests/fixtures/tokenizer_reference.json (scripts/fixtures/make_tokenizer_reference.py).

mod common;

use common::ids;

use lorafit::data::TextTokenizer;
use serde_json::Value;

#[test]
fn real_tokenizers_match_transformers() {
    let Some(assets) = common::assets() else {
        return;
    };
    let root = assets.join("tokenizers");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/tokenizer_reference.json")).unwrap(),
    )
    .unwrap();
    for (name, entry) in reference.as_object().unwrap() {
        let tok = TextTokenizer::from_file(&root.join(entry["file"].as_str().unwrap()), 0).unwrap();
        for case in entry["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{name}: {text:?}");
        }
    }
}

#[test]
fn recorded_ids_of_the_llama2_and_gpt2_assets() {
    let Some(assets) = common::assets() else {
        return;
    };
    let root = assets.join("tokenizers");
    for (tokenizer, encoded) in [
        ("llama2/llama_tokenizer.json", "llama2/llama_encoded.json"),
        ("gpt2/gpt2_tokenizer.json", "gpt2/gpt2_encoded_tokens.json"),
    ] {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join(encoded)).unwrap()).unwrap();
        let tok = TextTokenizer::from_file(&root.join(tokenizer), 0).unwrap();
        let got = tok.encode(case["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(got, ids(&case["token_ids"]), "{tokenizer}");
        assert_eq!(tok.decode(&got).unwrap(), case["decoded_text"].as_str().unwrap(), "{tokenizer}");
    }
}
