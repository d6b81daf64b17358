//! Chat templates as transformers loads and renders them: from the model directory or built in,
//! with the special-token strings they are rendered with, and the end-of-turn marker each writes.

use super::jinja::{dict, raise_exception, strftime_now, tojson, without_generation_tags};
use super::messages::Message;
use super::{common_prefix_len, first_word};
use crate::data::tokenizer::{read_json_object, read_tokenizer_config, TOKENIZER_CONFIG};
use crate::files::kind_name;
use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::Value as JValue;
use minijinja::Environment;
use serde_json::{Map, Value};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

/// ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message.
const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3 Instruct: BOS, then `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`
/// per message with the content trimmed (as Meta's template does).
const LLAMA3: &str = "{% for message in messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\
{{ content }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// The name under which the template is stored in its environment (no `.html`/`.json` suffix,
/// which would switch on auto-escaping).
const TEMPLATE_NAME: &str = "chat_template";

/// A Jinja chat template with the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    end_of_turn: OnceLock<std::result::Result<String, String>>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Names accepted by [`ChatTemplate::builtin`].
    pub const BUILTIN_NAMES: [&'static str; 2] = ["chatml", "llama3"];

    /// The model's chat template, as transformers loads it: `chat_template.jinja` when present,
    /// else `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// of which the one named `default` is used). BOS/EOS (and UNK/PAD) come from
    /// `tokenizer_config.json`, falling back to `special_tokens_map.json`. `Ok(None)` when the
    /// model has no chat template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config = read_tokenizer_config(dir)?;
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = if jinja_path.exists() {
            let text = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?;
            (text, jinja_path.display().to_string())
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(s)) => (s.clone(), config_path.display().to_string()),
                Some(Value::Array(list)) => {
                    let found = list.iter().find_map(|item| {
                        let obj = item.as_object()?;
                        (obj.get("name")?.as_str()? == "default")
                            .then(|| obj.get("template")?.as_str())
                            .flatten()
                    });
                    match found {
                        Some(s) => (s.to_string(), format!("{} (template `default`)", config_path.display())),
                        None => {
                            let names: Vec<&str> =
                                list.iter().filter_map(|i| i.get("name")?.as_str()).collect();
                            bail!(
                                "{}: `chat_template` lists several templates ({}) but none is \
                                 named `default`",
                                config_path.display(),
                                names.join(", ")
                            )
                        }
                    }
                }
                Some(other) => bail!(
                    "{}: `chat_template` must be a string or a list of {{name, template}}, \
                     found {}",
                    config_path.display(),
                    kind_name(other)
                ),
            }
        };
        let map_path = dir.join("special_tokens_map.json");
        let map: Map<String, Value> =
            if map_path.exists() { read_json_object(&map_path)? } else { Map::new() };
        let token = |key: &str| -> Result<Option<String>> {
            match token_string(&config, key).with_context(|| config_path.display().to_string())? {
                Some(t) => Ok(Some(t)),
                None => token_string(&map, key).with_context(|| map_path.display().to_string()),
            }
        };
        let mut template =
            ChatTemplate::from_source(source, origin, token("bos_token")?, token("eos_token")?)?;
        template.unk_token = token("unk_token")?;
        template.pad_token = token("pad_token")?;
        Ok(Some(template))
    }

    /// A template written into lorafit: `chatml` (no BOS, EOS `<|im_end|>`) or `llama3` (BOS
    /// `<|begin_of_text|>`, EOS `<|eot_id|>`).
    pub fn builtin(name: &str) -> Result<ChatTemplate> {
        let (source, bos, eos) = match name {
            "chatml" => (CHATML, None, "<|im_end|>"),
            "llama3" => (LLAMA3, Some("<|begin_of_text|>"), "<|eot_id|>"),
            other => bail!(
                "unknown built-in chat template `{other}` (built in: {})",
                Self::BUILTIN_NAMES.join(", ")
            ),
        };
        ChatTemplate::from_source(
            source.to_string(),
            format!("built-in `{name}`"),
            bos.map(str::to_string),
            Some(eos.to_string()),
        )
    }

    /// Compiles a template. `origin` says where it came from, for error messages.
    pub fn from_source(
        source: String,
        origin: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on (and jinja2's default of
        // dropping one trailing newline of the template, which is also minijinja's).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("cannot configure the template engine: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(&source))
            .map_err(|e| anyhow!("cannot compile the chat template from {origin}: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            bos_token,
            eos_token,
            unk_token: None,
            pad_token: None,
            end_of_turn: OnceLock::new(),
        })
    }

    /// The template text as loaded.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file, or a built-in name).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The conversation as text, as transformers' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` renders it, without tools: see
    /// [`ChatTemplate::render_with_tools`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// The conversation as text, as transformers' `apply_chat_template(messages, tools=tools,
    /// tokenize=False, add_generation_prompt=...)` renders it. The template sees `messages`
    /// (mappings with `role`, `content` and, when set, `reasoning_content` and `tool_calls`),
    /// `add_generation_prompt`, `tools`, `documents` (none), the special-token strings that
    /// are set (`bos_token`, `eos_token`, `unk_token`, `pad_token`), `raise_exception`,
    /// `strftime_now` (UTC) and a `tojson` filter that writes like Python's `json.dumps`.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&[JValue]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut ctx = std::collections::BTreeMap::<&str, JValue>::new();
        ctx.insert("messages", messages.iter().map(template_message).collect());
        ctx.insert("add_generation_prompt", JValue::from(add_generation_prompt));
        ctx.insert("tools", tools.map_or(JValue::from(()), |t| t.iter().cloned().collect()));
        ctx.insert("documents", JValue::from(()));
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(t) = token {
                ctx.insert(key, JValue::from(t.as_str()));
            }
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template from {}: {e}", self.origin))?;
        template.render(ctx).map_err(|e| anyhow!("the chat template from {} failed: {}", self.origin, e))
    }

    /// The text that ends an assistant turn (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3;
    /// empty when the template writes nothing after a turn), found by rendering probe
    /// conversations: the text after the reply, common to a reply followed by another turn and
    /// a final reply, up to (not including) its first whitespace after something else.
    pub fn end_of_turn(&self) -> Result<&str> {
        self.end_of_turn.get_or_init(|| self.probe_end_of_turn()).as_deref().map_err(|e| anyhow!("{e}"))
    }

    fn probe_end_of_turn(&self) -> std::result::Result<String, String> {
        const SYSTEM: &str = "lorafit probe system";
        const USER: &str = "lorafit probe question";
        const REPLY: &str = "lorafit probe reply";
        const REPLY2: &str = "lorafit probe second reply";
        let mut last_err = String::new();
        for with_system in [false, true] {
            let mut msgs = Vec::new();
            if with_system {
                msgs.push(Message::new("system", SYSTEM));
            }
            msgs.push(Message::new("user", USER));
            msgs.push(Message::new("assistant", REPLY));
            let text = match self.render(&msgs, false) {
                Ok(t) => t,
                Err(e) => {
                    last_err = format!("{e:#}");
                    continue;
                }
            };
            let Some(pos) = text.rfind(REPLY) else {
                last_err = "the probe reply does not appear in the rendered text".into();
                continue;
            };
            let final_suffix = &text[pos + REPLY.len()..];
            msgs.push(Message::new("user", USER));
            msgs.push(Message::new("assistant", REPLY2));
            let common = match self.render(&msgs, false) {
                Ok(two) => match two.find(REPLY) {
                    Some(p) => {
                        let mid_suffix = &two[p + REPLY.len()..];
                        &final_suffix[..common_prefix_len(final_suffix, mid_suffix)]
                    }
                    None => final_suffix,
                },
                Err(_) => final_suffix,
            };
            return Ok(first_word(common).to_string());
        }
        Err(format!(
            "cannot find the end-of-turn marker of the chat template from {}: rendering a \
             probe conversation failed: {last_err}",
            self.origin
        ))
    }
}

/// A message as the template sees it: a mapping with `role`, `content`, then `reasoning_content`
/// and `tool_calls` when set, each call `{"type": "function", "function": {"name",
/// "arguments"}}`, keys in that order (as the Python dicts transformers passes).
fn template_message(m: &Message) -> JValue {
    let mut fields =
        vec![("role", JValue::from(m.role.as_str())), ("content", JValue::from(m.content.as_str()))];
    if let Some(reasoning) = &m.reasoning_content {
        fields.push(("reasoning_content", JValue::from(reasoning.as_str())));
    }
    if !m.tool_calls.is_empty() {
        let calls = m.tool_calls.iter().map(|call| {
            let function =
                dict(vec![("name", JValue::from(call.name.as_str())), ("arguments", call.arguments.clone())]);
            dict(vec![("type", JValue::from("function")), ("function", function)])
        });
        fields.push(("tool_calls", calls.collect()));
    }
    dict(fields)
}

/// A special token given as a string or as an AddedToken object (`{"content": ...}`).
fn token_string(map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("`{key}` is an object without a string `content`"),
        },
        Some(other) => {
            bail!("`{key}` must be a string or a token object, found {}", kind_name(other))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::from_source(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ s | tojson }}|{{ s | tojson(ensure_ascii=true) }}|{{ f | tojson }}"
                .into(),
            "test".into(),
            None,
            None,
        )
        .unwrap();
        let ctx = minijinja::context! {
            x => minijinja::context! { b => vec![1, 2], a => "<&>" },
            s => "é\n\"🙂",
            f => vec![1.0, 0.1, 1e-5, 1e16, 2.5],
        };
        let out = t.env.get_template(TEMPLATE_NAME).unwrap().render(ctx).unwrap();
        let parts: Vec<&str> = out.split('|').collect();
        assert!(
            parts[0] == r#"{"b": [1, 2], "a": "<&>"}"# || parts[0] == r#"{"a": "<&>", "b": [1, 2]}"#,
            "{}",
            parts[0]
        );
        assert!(parts[1].contains("[\n    1,\n    2\n  ]"), "{}", parts[1]);
        assert_eq!(parts[2], "\"é\\n\\\"🙂\"");
        assert_eq!(parts[3], "\"\\u00e9\\n\\\"\\ud83d\\ude42\"");
        assert_eq!(parts[4], "[1.0, 0.1, 1e-05, 1e+16, 2.5]");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{% generation %}{{ m.content }}{%- endgeneration %}\n{% endfor %}";
        let t = ChatTemplate::from_source(src.into(), "test".into(), None, None).unwrap();
        let out = t.render(&[Message::new("user", "a"), Message::new("assistant", "b")], false).unwrap();
        assert_eq!(out, "ab");
    }
}
