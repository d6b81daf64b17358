//! Chat conversations → text segments: records in OpenAI (`messages`) or ShareGPT
//! (`conversations`) layout are parsed into [`Message`]s, rendered with the model's Jinja chat
//! template ([`ChatTemplate`], rendered the way transformers' `apply_chat_template` renders it)
//! and split by [`render_segments`] into `(text, trainable)` segments for
//! [`format`](super::format)'s tokenizer.
//!
//! # What is trainable
//!
//! An assistant turn's trainable span runs from the end of the assistant header the template
//! writes (for Qwen3 `<|im_start|>assistant\n`) to the end of the end-of-turn marker right after
//! the turn (`<|im_end|>`), marker included: it is what the model must generate to answer and then
//! stop. Whatever follows the marker (the `\n` before the next header) is not trainable. Anything
//! the template itself puts inside the turn (Qwen3's `<think>\n\n</think>\n\n` block) is part of
//! what the model generates, so it is trainable too.
//!
//! # How spans are found
//!
//! The whole conversation is rendered once, and every span is located in that text:
//! * the start of assistant message `i` is the length of the rendering of `messages[..i]` with
//!   `add_generation_prompt = true`, which must be a prefix of the full text (the prefix ends with
//!   the assistant header). When the template has no generation prompt (the rendering is the
//!   same without it), or its prompt differs from the header it writes inside a conversation,
//!   the header follows that point instead: the span then starts where the message's text does
//!   (found backwards from the turn's end, so a header word equal to the message cannot fool
//!   it), including the spaces before it (` Hello` stays one word).
//!   When the template renders an earlier turn differently once later messages exist (Qwen3
//!   keeps an assistant turn's reasoning only after the last user message, so a tool-calling
//!   turn loses it when the user speaks again), that rendering is not a prefix of the text; the
//!   start is then the end of the longest tail of it that the text after the previous assistant
//!   turn begins with, which must include the generation prompt (the messages in between and
//!   the header);
//! * the end is the first end-of-turn marker after the start that follows the message's visible
//!   text (its content after any `</think>`, trimmed) and, for a message with tool calls, each
//!   call's function name and arguments (as `tojson` writes them; by name alone when no marker
//!   follows that) after it in order, since templates write calls after the text, each in its
//!   own format; the marker is detected once per template by rendering probe conversations.
//!
//! Only earlier messages are rendered as prefixes, never a conversation ending in an assistant
//! turn, so templates that render the last assistant turn differently from earlier ones (Qwen3
//! keeps reasoning only after the last user message) are handled. A span that cannot be located
//! is an error naming the message.
//!
//! # Tools, tool calls and reasoning
//!
//! A record's `tools` column (a list of function schemas, or the JSON text of one as
//! LLaMA-Factory writes it) reaches the template as `tools`, each schema wrapped as
//! `{"type": "function", "function": schema}` unless it already is (the shape transformers gives
//! the template for a Python function). Function calls (ShareGPT `function_call` turns, OpenAI
//! `tool_calls`, LLaMA-Factory `tool_call` content parts) become the `tool_calls` of an
//! assistant message, `{"type": "function", "function": {"name", "arguments"}}` with the
//! arguments a mapping, and are trained like any assistant turn; tool results (`observation`,
//! role `tool`) are context. `reasoning` content parts become the message's
//! `reasoning_content`, which Qwen3's template writes in `<think>`. A template that renders
//! nothing of the tools or calls it is given, or never reads `reasoning_content`, is an error
//! rather than a silent loss. JSON given as text keeps its key order, as Python's `json.loads`
//! does; JSON objects the file reader parsed come with their keys sorted.
//!
//! # BOS
//!
//! The rendered text is tokenized without the tokenizer's special tokens, as transformers'
//! `apply_chat_template(tokenize=True)` does: a template that starts with BOS (Llama 3's
//! `<|begin_of_text|>`) writes it itself, and one that does not gets none.

use crate::files::kind_name;
use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Serde, Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind as JErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

/// One turn of a conversation. `role` is one of `system`, `user`, `assistant`, `tool`; only
/// assistant turns carry reasoning or tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The reasoning before the answer, given to the template as `reasoning_content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            reasoning_content: None,
            tool_calls: vec![],
        }
    }
}

/// A function call the assistant makes. `arguments` is a mapping (templates write it with
/// `tojson`), its keys in the order they were written when it came as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: JValue,
}

/// A record's conversation and the tools offered in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The template's `tools`: `{"type": "function", "function": schema}` each; `None` when the
    /// record has no tools column (or an empty one).
    pub tools: Option<Vec<JValue>>,
}

impl From<Vec<Message>> for Conversation {
    fn from(messages: Vec<Message>) -> Conversation {
        Conversation { messages, tools: None }
    }
}

/// The columns tried, in order, when no messages column is configured.
pub const DEFAULT_MESSAGES_FIELDS: [&str; 2] = ["messages", "conversations"];

/// The optional top-level column holding a system prompt.
pub const SYSTEM_FIELD: &str = "system";

/// The optional top-level column holding the tools offered to the model.
pub const TOOLS_FIELD: &str = "tools";

/// The ShareGPT role of a turn whose value is a function call (JSON text of `{"name",
/// "arguments"}` or a list of them): an assistant turn with tool calls.
pub const FUNCTION_CALL_ROLE: &str = "function_call";

/// Role names accepted in records (compared case-insensitively) and the chat role each maps to.
/// A [`FUNCTION_CALL_ROLE`] turn is a call the model made, so it is an assistant turn, trained;
/// the function results (`observation`, ...) are `tool` turns, context.
pub const ROLE_NAMES: [(&str, &str); 13] = [
    ("user", "user"),
    ("human", "user"),
    ("assistant", "assistant"),
    ("gpt", "assistant"),
    ("chatgpt", "assistant"),
    ("bing", "assistant"),
    ("bard", "assistant"),
    ("system", "system"),
    ("tool", "tool"),
    ("function", "tool"),
    ("observation", "tool"),
    (FUNCTION_CALL_ROLE, "assistant"),
    ("ipython", "tool"),
];

/// The chat role for a role name found in a record (`human` → `user`, `gpt` → `assistant`, ...).
pub fn map_role(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    ROLE_NAMES.iter().find(|(from, _)| *from == lower).map(|(_, to)| *to)
}

/// The conversation of one record.
///
/// `messages_field` names the column holding the list of turns; `None` tries
/// [`DEFAULT_MESSAGES_FIELDS`] in order. Each turn is an object with `role`/`content` (OpenAI)
/// or `from`/`value` (ShareGPT) keys; content is a string or a list of parts: text parts
/// (`{"type": "text", "text": ...}`, or `"value"` instead of `"text"`) joined with `\n`, and in
/// assistant turns `reasoning` and `tool_call` parts (LLaMA-Factory). Assistant turns may also
/// have OpenAI `tool_calls` (their content may then be null) and a `reasoning_content` string.
/// A non-empty top-level [`SYSTEM_FIELD`] string becomes a leading system message; the
/// `tools_field` column, when present, gives the tools. Errors name `file` and `row` (1-based,
/// as [`Record::row`](super::source::Record)).
pub fn parse_conversation(
    file: &Path,
    row: usize,
    fields: &Map<String, Value>,
    messages_field: Option<&str>,
    tools_field: &str,
) -> Result<Conversation> {
    let at = || format!("{}:{row}", file.display());
    let present = || {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        if names.is_empty() {
            "no fields".to_string()
        } else {
            names.join(", ")
        }
    };
    let (column, list) = match messages_field {
        Some(name) => match fields.get(name) {
            Some(v) => (name, v),
            None => {
                bail!("{}: the row has no `{name}` field with the conversation (it has: {})", at(), present())
            }
        },
        None => match DEFAULT_MESSAGES_FIELDS.iter().find_map(|name| fields.get(*name).map(|v| (*name, v))) {
            Some(found) => found,
            None => bail!(
                "{}: the row has neither a `messages` nor a `conversations` field with the \
                 conversation (it has: {}); name the column holding it in the data config",
                at(),
                present()
            ),
        },
    };
    let turns = match list {
        Value::Array(turns) => turns,
        other => bail!("{}: `{column}` must be a list of messages, found {}", at(), kind_name(other)),
    };
    if turns.is_empty() {
        bail!("{}: `{column}` is an empty conversation", at());
    }
    let tools = match fields.get(tools_field) {
        Some(value) => parse_tools(value).map_err(|why| anyhow!("{}: `{tools_field}`: {why}", at()))?,
        None => None,
    };

    let mut messages = Vec::with_capacity(turns.len() + 1);
    match fields.get(SYSTEM_FIELD) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => messages.push(Message::new("system", s)),
        Some(other) => {
            bail!("{}: the `{SYSTEM_FIELD}` field must be a string, found {}", at(), kind_name(other))
        }
    }
    for (i, turn) in turns.iter().enumerate() {
        let n = i + 1;
        let obj = match turn {
            Value::Object(obj) => obj,
            other => bail!(
                "{}: message {n} of `{column}` must be an object with role and content, found {}",
                at(),
                kind_name(other)
            ),
        };
        let role_key = if obj.contains_key("role") { "role" } else { "from" };
        let role_name = match obj.get(role_key) {
            Some(Value::String(s)) => s,
            Some(other) => bail!(
                "{}: message {n} of `{column}`: `{role_key}` must be a string, found {}",
                at(),
                kind_name(other)
            ),
            None => bail!("{}: message {n} of `{column}` has neither a `role` nor a `from` key", at()),
        };
        let role = match map_role(role_name) {
            Some(role) => role,
            None => {
                let accepted: Vec<&str> = ROLE_NAMES.iter().map(|(from, _)| *from).collect();
                bail!(
                    "{}: message {n} of `{column}` has the unknown role `{role_name}` (accepted: {})",
                    at(),
                    accepted.join(", ")
                )
            }
        };
        let message = parse_turn(role, role_name, obj)
            .map_err(|why| anyhow!("{}: message {n} of `{column}` ({role_name}): {why}", at()))?;
        if role == "system" && i == 0 && !messages.is_empty() {
            bail!(
                "{}: the row has both a `{SYSTEM_FIELD}` field and a system message in \
                 `{column}`; keep one",
                at()
            );
        }
        messages.push(message);
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("{}: the conversation in `{column}` has no assistant turn, so nothing to train on", at());
    }
    Ok(Conversation { messages, tools })
}

/// One turn's message (its role already checked), or why it cannot be used.
fn parse_turn(role: &str, role_name: &str, obj: &Map<String, Value>) -> std::result::Result<Message, String> {
    let mut message = Message::new(role, "");
    let content_key = if obj.contains_key("content") { "content" } else { "value" };
    let content = obj.get(content_key);
    if role_name.eq_ignore_ascii_case(FUNCTION_CALL_ROLE) {
        match content {
            Some(value) => message.tool_calls = tool_calls(value)?,
            None => return Err(format!("has no `{content_key}` with the call")),
        }
    } else {
        // OpenAI writes `content: null` beside an assistant's tool calls.
        let calls_only = obj.get("tool_calls").is_some_and(|v| !v.is_null());
        match content {
            Some(Value::String(s)) => message.content = s.clone(),
            Some(Value::Array(parts)) => content_parts(parts, &mut message)?,
            None | Some(Value::Null) if calls_only => {}
            Some(other) => {
                return Err(format!(
                    "`{content_key}` must be a string or a list of content parts, found {}",
                    kind_name(other)
                ))
            }
            None => return Err("has neither a `content` nor a `value` key".to_string()),
        }
    }
    match obj.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(value) => {
            message.tool_calls.extend(tool_calls(value).map_err(|why| format!("`tool_calls`: {why}"))?)
        }
    }
    match obj.get("reasoning_content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => message.reasoning_content = Some(s.clone()),
        Some(other) => {
            return Err(format!("`reasoning_content` must be a string, found {}", kind_name(other)))
        }
    }
    if role != "assistant" && (!message.tool_calls.is_empty() || message.reasoning_content.is_some()) {
        return Err("only assistant messages can hold tool calls or reasoning".to_string());
    }
    Ok(message)
}

/// Reads a content given as a list of parts into `message`: text parts (joined with `\n`) into
/// its content, `reasoning` parts into its reasoning, `tool_call` parts into its tool calls.
fn content_parts(parts: &[Value], message: &mut Message) -> std::result::Result<(), String> {
    let (mut texts, mut reasoning) = (Vec::with_capacity(parts.len()), Vec::new());
    for (i, part) in parts.iter().enumerate() {
        let n = i + 1;
        let obj = match part {
            Value::Object(obj) => obj,
            Value::String(s) => {
                texts.push(s.as_str());
                continue;
            }
            other => return Err(format!("content part {n} must be an object, found {}", kind_name(other))),
        };
        let kind = match obj.get("type") {
            None | Some(Value::Null) => "text",
            Some(Value::String(t)) if ["text", "reasoning", "tool_call"].contains(&t.as_str()) => t.as_str(),
            Some(other) => {
                return Err(format!(
                    "content part {n} has type {other}; only text, reasoning and tool_call parts \
                     are supported"
                ))
            }
        };
        let value = match obj.get("text").or_else(|| obj.get("value")) {
            Some(value) => value,
            None => return Err(format!("content part {n} has neither a `text` nor a `value` key")),
        };
        match (kind, value) {
            ("tool_call", value) => message
                .tool_calls
                .extend(tool_calls(value).map_err(|why| format!("content part {n}: {why}"))?),
            (_, Value::String(s)) if kind == "reasoning" => reasoning.push(s.as_str()),
            (_, Value::String(s)) => texts.push(s.as_str()),
            (_, other) => {
                return Err(format!(
                    "content part {n}: the {kind} must be a string, found {}",
                    kind_name(other)
                ))
            }
        }
    }
    message.content = texts.join("\n");
    if !reasoning.is_empty() {
        message.reasoning_content = Some(reasoning.join("\n"));
    }
    Ok(())
}

/// A JSON value as templates see it: JSON text is parsed keeping its key order (as Python's
/// `json.loads`); a value the file reader already parsed comes with its keys sorted.
fn json_value(value: &Value) -> std::result::Result<JValue, String> {
    match value {
        Value::String(text) => serde_json::from_str(text).map_err(|e| format!("is not valid JSON ({e})")),
        other => Ok(JValue::from(Serde(other))),
    }
}

fn kind_of(v: &JValue) -> &'static str {
    match v.kind() {
        ValueKind::Map => "an object",
        ValueKind::Seq => "a list",
        ValueKind::String => "a string",
        ValueKind::Number => "a number",
        ValueKind::Bool => "a boolean",
        ValueKind::None | ValueKind::Undefined => "null",
        _ => "something else",
    }
}

/// The calls in a function-call value: one call or a list of them, each `{"name", "arguments"}`
/// or nested in `function` (OpenAI), as JSON text or JSON.
fn tool_calls(value: &Value) -> std::result::Result<Vec<ToolCall>, String> {
    const SHAPE: &str = r#"{"name": ..., "arguments": {...}}"#;
    let parsed = json_value(value).map_err(|why| format!("the tool call {why}; write it as {SHAPE}"))?;
    let items: Vec<JValue> = match parsed.kind() {
        ValueKind::Seq => parsed.try_iter().map_err(|e| e.to_string())?.collect(),
        _ => vec![parsed],
    };
    if items.is_empty() {
        return Err(format!("the list of tool calls is empty; write each call as {SHAPE}"));
    }
    let numbered = items.len() > 1;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            tool_call(item).map_err(|why| {
                let which = if numbered { format!("tool call {}", i + 1) } else { "the tool call".into() };
                format!("{which} {why}; write it as {SHAPE}")
            })
        })
        .collect()
}

/// One call, bare or nested in `function`; JSON-text arguments are parsed into their mapping.
fn tool_call(item: &JValue) -> std::result::Result<ToolCall, String> {
    let field = |v: &JValue, key: &str| v.get_attr(key).ok().filter(|f| !f.is_undefined() && !f.is_none());
    let call = match field(item, "function") {
        Some(function) if function.kind() == ValueKind::Map => function,
        _ => item.clone(),
    };
    if call.kind() != ValueKind::Map {
        return Err(format!("must be an object, found {}", kind_of(&call)));
    }
    let name = match field(&call, "name") {
        Some(name) => match name.as_str() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => return Err(format!("has a `name` that is not a non-empty string ({})", kind_of(&name))),
        },
        None => return Err("has no `name`".to_string()),
    };
    let arguments = match field(&call, "arguments") {
        Some(args) if args.kind() == ValueKind::Map => args,
        // OpenAI writes the arguments as JSON text; templates expect the mapping.
        Some(args) if args.kind() == ValueKind::String => {
            let text = args.as_str().unwrap_or_default();
            match serde_json::from_str::<JValue>(text) {
                Ok(parsed) if parsed.kind() == ValueKind::Map => parsed,
                Ok(other) => {
                    return Err(format!(
                        "of `{name}` has arguments that are {}, not an object",
                        kind_of(&other)
                    ))
                }
                Err(e) => return Err(format!("of `{name}` has arguments that are not valid JSON ({e})")),
            }
        }
        Some(other) => {
            return Err(format!("of `{name}` has arguments that are {}, not an object", kind_of(&other)))
        }
        None => return Err(format!("of `{name}` has no `arguments`")),
    };
    Ok(ToolCall { name, arguments })
}

/// The tools column: a list of function schemas, or JSON text of one (LLaMA-Factory); `None`
/// when null or empty text. Bare schemas are wrapped as `{"type": "function", "function": ...}`.
fn parse_tools(value: &Value) -> std::result::Result<Option<Vec<JValue>>, String> {
    match value {
        Value::Null => return Ok(None),
        Value::String(s) if s.trim().is_empty() => return Ok(None),
        _ => {}
    }
    let parsed = json_value(value)?;
    if parsed.kind() != ValueKind::Seq {
        return Err(format!("must be a list of function schemas, found {}", kind_of(&parsed)));
    }
    let mut tools = Vec::new();
    for (i, tool) in parsed.try_iter().map_err(|e| e.to_string())?.enumerate() {
        if tool.kind() != ValueKind::Map {
            return Err(format!(
                "tool {} must be an object (a function schema), found {}",
                i + 1,
                kind_of(&tool)
            ));
        }
        let wrapped = tool.get_attr("type").ok().is_some_and(|t| t.as_str() == Some("function"));
        tools.push(if wrapped { tool } else { dict(vec![("type", "function".into()), ("function", tool)]) });
    }
    Ok(Some(tools))
}

/// Which parts of a rendered conversation carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn.
    #[default]
    AssistantTurns,
    /// Only the last assistant turn; earlier ones are context.
    LastAssistantTurn,
    /// The whole rendered text, prompts included.
    All,
}

impl FromStr for TrainOn {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<TrainOn> {
        Ok(match s {
            "assistant_turns" => TrainOn::AssistantTurns,
            "last_assistant_turn" => TrainOn::LastAssistantTurn,
            "all" => TrainOn::All,
            other => bail!(
                "unknown train_on value `{other}` (accepted: assistant_turns, \
                 last_assistant_turn, all)"
            ),
        })
    }
}

impl fmt::Display for TrainOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrainOn::AssistantTurns => "assistant_turns",
            TrainOn::LastAssistantTurn => "last_assistant_turn",
            TrainOn::All => "all",
        })
    }
}

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
        let config_path = dir.join("tokenizer_config.json");
        let config: Map<String, Value> =
            if config_path.exists() { read_json_object(&config_path)? } else { Map::new() };
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

/// A mapping with its keys in the order given, like a Python dict (minijinja's maps keep
/// insertion order with its `preserve_order` feature).
fn dict(fields: Vec<(&'static str, JValue)>) -> JValue {
    JValue::from_pairs(fields)
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!("{} must hold a JSON object", path.display()),
        Err(e) => bail!("{} is not valid JSON: {e}", path.display()),
    }
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

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its own
/// masks; it renders its body unchanged. Rewritten to an always-true `if` with the same
/// whitespace control, which renders the same.
fn without_generation_tags(source: &str) -> String {
    static OPEN: OnceLock<regex::Regex> = OnceLock::new();
    static CLOSE: OnceLock<regex::Regex> = OnceLock::new();
    let open = OPEN.get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").unwrap());
    let close = CLOSE.get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").unwrap());
    let s = open.replace_all(source, "{%${1} if true ${2}%}");
    close.replace_all(&s, "{%${1} endif ${2}%}").into_owned()
}

fn raise_exception(message: String) -> std::result::Result<JValue, JError> {
    Err(JError::new(JErrorKind::InvalidOperation, format!("the template raised an exception: {message}")))
}

fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(secs, &format)
}

/// `strftime` for a UTC time: `%Y %y %m %d %e %H %I %M %S %p %j %B %b %h %A %a %%`, with glibc's
/// `-` flag (no padding); other directives are kept as written.
fn strftime_utc(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = crate::clock::civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - crate::clock::days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num((hour + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, without jinja2's HTML escaping.
fn tojson(value: &JValue, indent: Option<JValue>, kwargs: Kwargs) -> std::result::Result<JValue, JError> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JValue>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => {
                    return Err(JError::new(
                        JErrorKind::InvalidOperation,
                        "tojson: indent must be a number or a string",
                    ))
                }
            },
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (mut item_sep, mut key_sep) =
        (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string());
    if let Some(seps) = kwargs.get::<Option<JValue>>("separators")? {
        if !seps.is_none() {
            let parts: Vec<JValue> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    item_sep = a.as_str().unwrap_or_default().to_string();
                    key_sep = b.as_str().unwrap_or_default().to_string();
                }
                _ => {
                    return Err(JError::new(
                        JErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
    }
    kwargs.assert_all_used()?;
    let opts = PyJson { indent, item_sep, key_sep, ensure_ascii, sort_keys };
    let mut out = String::new();
    opts.write(value, 0, &mut out)?;
    Ok(JValue::from_safe_string(out))
}

/// `value` as Python's `json.dumps(value, ensure_ascii=False)` writes it (what `tojson` gives).
fn py_json(value: &JValue) -> String {
    let opts = PyJson {
        indent: None,
        item_sep: ", ".into(),
        key_sep: ": ".into(),
        ensure_ascii: false,
        sort_keys: false,
    };
    let mut out = String::new();
    // Values read from JSON always serialize; were one not to, its partial text would match
    // nothing and the call would be found by name.
    let _ = opts.write(value, 0, &mut out);
    out
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, v: &JValue, depth: usize, out: &mut String) -> std::result::Result<(), JError> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    out.push_str(&py_float(f64::try_from(v.clone())?));
                }
            }
            ValueKind::String => self.write_str(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JValue> = v.try_iter()?.collect();
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.item(i == 0, depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.close(items.is_empty(), depth, ']', out);
            }
            ValueKind::Map => {
                let mut keys: Vec<JValue> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    self.item(i == 0, depth + 1, out);
                    match key.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => self.write_str(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(key)?, depth + 1, out)?;
                }
                self.close(keys.is_empty(), depth, '}', out);
            }
            _ => self.write_str(&v.to_string(), out),
        }
        Ok(())
    }

    fn item(&self, first: bool, depth: usize, out: &mut String) {
        if !first {
            out.push_str(&self.item_sep);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn close(&self, empty: bool, depth: usize, c: char, out: &mut String) {
        if let (Some(indent), false) = (&self.indent, empty) {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(c);
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e-05`, `1e+16`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// Leading whitespace plus the run of non-whitespace after it: `<|im_end|>\n<|im_start|>` →
/// `<|im_end|>`, ` </s>` → ` </s>`; empty when `s` is only whitespace.
fn first_word(s: &str) -> &str {
    let lead = s.len() - s.trim_start().len();
    let rest = &s[lead..];
    if rest.is_empty() {
        return "";
    }
    let word = rest.find(char::is_whitespace).unwrap_or(rest.len());
    &s[..lead + word]
}

/// The part of an assistant message that templates write as is: the text after any
/// `</think>` (templates move or drop reasoning), trimmed (templates often trim).
fn visible_tail(content: &str) -> &str {
    match content.rfind("</think>") {
        Some(p) => content[p + "</think>".len()..].trim(),
        None => content.trim(),
    }
}

/// The conversation rendered (`add_generation_prompt = false`), refusing a template that would
/// silently drop what the conversation holds: the rendering must change with the tools and with
/// the tool calls, and a template given reasoning must read `reasoning_content`.
pub fn render_conversation(template: &ChatTemplate, chat: &Conversation) -> Result<String> {
    let messages = &chat.messages;
    let tools = chat.tools.as_deref();
    let text = template.render_with_tools(messages, tools, false)?;
    let same = |other: Result<String>| other.is_ok_and(|t| t == text);
    if let Some(tools) = tools.filter(|t| !t.is_empty()) {
        if same(template.render_with_tools(messages, None, false)) {
            bail!(
                "the chat template from {} ignores `tools`: the conversation's {} tool \
                 definition(s) would not reach the model; use a chat template with tool support \
                 (the model's own, if it has one)",
                template.origin,
                tools.len()
            );
        }
    }
    if messages.iter().any(|m| !m.tool_calls.is_empty()) {
        let without: Vec<Message> =
            messages.iter().map(|m| Message { tool_calls: vec![], ..m.clone() }).collect();
        if same(template.render_with_tools(&without, tools, false)) {
            bail!(
                "the chat template from {} does not render `tool_calls`: the conversation's \
                 function calls would be lost; use a chat template with tool support (the \
                 model's own, if it has one)",
                template.origin
            );
        }
    }
    if let Some(i) = messages.iter().position(|m| m.reasoning_content.is_some()) {
        if !template.source.contains("reasoning_content") {
            bail!(
                "the chat template from {} never reads `reasoning_content`, so the reasoning of \
                 message {} would be lost; use a template that renders it (Qwen3's does) or \
                 leave the reasoning out of the data",
                template.origin,
                i + 1
            );
        }
    }
    Ok(text)
}

/// The conversation rendered ([`render_conversation`]) and the byte ranges of its assistant
/// turns in it, in order: each from the end of the assistant header to the end of the
/// end-of-turn marker after the turn (see the module documentation for how they are found).
pub fn assistant_spans(template: &ChatTemplate, chat: &Conversation) -> Result<(String, Vec<Range<usize>>)> {
    let text = render_conversation(template, chat)?;
    let marker = template.end_of_turn()?;
    let mut spans = Vec::new();
    let mut prev_end = 0;
    for (i, message) in chat.messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let n = i + 1;
        let (base, header_follows) = turn_start(template, chat, i, &text, prev_end)?;
        if base < prev_end {
            bail!(
                "cannot locate assistant message {n} in the text rendered by the chat template \
                 from {}: the text before it ends inside the previous assistant turn",
                template.origin
            );
        }
        let end = turn_end(&text, base, message, marker).ok_or_else(|| {
            let what = if message.tool_calls.is_empty() {
                format!("its text {:?}", visible_tail(&message.content))
            } else {
                let names: Vec<String> = message.tool_calls.iter().map(|c| format!("`{}`", c.name)).collect();
                format!("its text {:?} and calls to {}", visible_tail(&message.content), names.join(", "))
            };
            anyhow!(
                "cannot locate the end of assistant message {n} in the text rendered by the \
                 chat template from {}: {what} followed by the end-of-turn marker {:?} do not \
                 appear after its header (the template changes the message)",
                template.origin,
                marker
            )
        })?;
        let start = match header_follows {
            false => base,
            true if message.tool_calls.is_empty() => {
                content_start(&text, base, end, marker, &message.content)
            }
            true => bail!(
                "cannot locate the start of assistant message {n} in the text rendered by the \
                 chat template from {}: the template has no generation prompt to show where a \
                 turn with tool calls starts",
                template.origin
            ),
        };
        spans.push(start..end);
        prev_end = end;
    }
    Ok((text, spans))
}

/// Where the text of assistant message `i` starts in `text` (the full rendering), and whether
/// the assistant header may still come after that point. The start is the end of the rendering
/// of the messages before it with the generation prompt, when that is a prefix of `text` and the
/// prompt adds something (the header). Otherwise (a template without generation prompt, or one
/// whose prompt differs from the header it writes in a conversation) it is the longest common
/// prefix of that rendering and `text`, at least the rendering without the prompt, and the
/// header may follow. When an earlier turn renders differently there (see the module
/// documentation), it is the end of the longest tail of the prompted rendering, prompt
/// included, that the text after the previous assistant turn (`prev_end`) begins with.
fn turn_start(
    template: &ChatTemplate,
    chat: &Conversation,
    i: usize,
    text: &str,
    prev_end: usize,
) -> Result<(usize, bool)> {
    let before = &chat.messages[..i];
    let tools = chat.tools.as_deref();
    let prompted = template.render_with_tools(before, tools, true);
    let plain = template.render_with_tools(before, tools, false);
    match (&prompted, &plain) {
        (Ok(p), Ok(r)) if text.starts_with(p.as_str()) => return Ok((p.len(), p == r)),
        (Ok(p), Ok(r)) if text.starts_with(r.as_str()) && p.starts_with(r.as_str()) => {
            return Ok((common_prefix_len(text, p).max(r.len()), true))
        }
        (Ok(p), Err(_)) if text.starts_with(p.as_str()) => return Ok((p.len(), false)),
        (Err(_), Ok(r)) if text.starts_with(r.as_str()) => return Ok((r.len(), true)),
        (Ok(p), Ok(r)) if p.len() > r.len() && p.starts_with(r.as_str()) => {
            let prompt = p.len() - r.len();
            if let Some(tail) = longest_tail_at(p, &text[prev_end..]).filter(|&len| len >= prompt) {
                return Ok((prev_end + tail, false));
            }
        }
        _ => {}
    }
    let why = match (prompted, plain) {
        (Err(e), _) | (_, Err(e)) => format!("rendering the messages before it failed: {e:#}"),
        _ => "the rendering of the messages before it is not a prefix of the whole \
              conversation's"
            .to_string(),
    };
    bail!(
        "cannot locate the start of assistant message {} in the text rendered by the chat \
         template from {}: {why}",
        i + 1,
        template.origin
    )
}

/// The length of the longest tail of `s` that `rest` begins with, if any (on character
/// boundaries).
fn longest_tail_at(s: &str, rest: &str) -> Option<usize> {
    s.char_indices().map(|(i, _)| s.len() - i).find(|&len| rest.starts_with(&s[s.len() - len..]))
}

/// Where the message's text starts in the turn `text[base..end]`, a header coming first: the
/// turn without its end-of-turn `marker` ends with the message's trimmed text (or, if the
/// template changed it, its visible part), so the text starts that far from the end; moved back
/// over the spaces and tabs before it (so ` Hello` after Llama 2's `[/INST]` stays one word).
fn content_start(text: &str, base: usize, end: usize, marker: &str, content: &str) -> usize {
    let body = text[base..end - marker.len()].trim_end();
    let whole = content.trim();
    let len = if body.ends_with(whole) { whole.len() } else { visible_tail(content).len() };
    let before = &body[..body.len() - len];
    base + before.trim_end_matches([' ', '\t']).len()
}

/// The end (after the end-of-turn marker) of the assistant turn of `message` starting at
/// `start`: the first marker that follows what the message says ([`says_all`]). Tool calls are
/// looked for with their arguments as `tojson` writes them first, so that a marker inside an
/// argument cannot end the turn early, then by their names alone, for templates that write
/// arguments their own way.
fn turn_end(text: &str, start: usize, message: &Message, marker: &str) -> Option<usize> {
    let rest = &text[start..];
    if marker.is_empty() {
        // Nothing closes a turn: it ends with the text, which tool calls would follow.
        let needle = visible_tail(&message.content);
        return match message.tool_calls.is_empty() {
            true => rest.find(needle).map(|p| start + p + needle.len()),
            false => None,
        };
    }
    let step = marker.chars().next().map_or(1, char::len_utf8);
    [true, false].into_iter().find_map(|with_arguments| {
        let mut from = 0;
        while let Some(p) = rest[from..].find(marker) {
            let m = from + p;
            if says_all(&rest[..m], message, with_arguments) {
                return Some(start + m + marker.len());
            }
            from = m + step;
        }
        None
    })
}

/// Whether `turn` (an assistant turn up to an end-of-turn marker) ends with the message's
/// visible text or, for a message with tool calls, holds that text followed by each call's
/// function name (and `with_arguments`, its arguments as JSON) in order: templates write calls
/// after the text, each in its own format.
fn says_all(turn: &str, message: &Message, with_arguments: bool) -> bool {
    let needle = visible_tail(&message.content);
    if message.tool_calls.is_empty() {
        return turn.trim_end().ends_with(needle);
    }
    let mut needles = vec![needle.to_string()];
    for call in &message.tool_calls {
        needles.push(call.name.clone());
        if with_arguments {
            needles.push(py_json(&call.arguments));
        }
    }
    let mut rest = turn;
    for needle in &needles {
        match rest.find(needle.as_str()) {
            Some(p) => rest = &rest[p + needle.len()..],
            None => return false,
        }
    }
    true
}

/// The conversation as `(text, trainable)` segments whose concatenation is the rendered
/// conversation ([`render_conversation`]): assistant turns (tool calls included) trainable per
/// `train_on` (see the module documentation for what a turn's span covers), the rest (tool
/// results included) not. Adjacent segments never share a flag.
pub fn render_segments(
    template: &ChatTemplate,
    chat: &Conversation,
    train_on: TrainOn,
) -> Result<Vec<(String, bool)>> {
    if train_on == TrainOn::All {
        return Ok(vec![(render_conversation(template, chat)?, true)]);
    }
    let (text, spans) = assistant_spans(template, chat)?;
    let trainable: &[Range<usize>] = match train_on {
        TrainOn::LastAssistantTurn => match spans.len() {
            0 => &[],
            n => &spans[n - 1..],
        },
        _ => &spans,
    };
    let mut segments: Vec<(String, bool)> = Vec::new();
    let mut push = |s: &str, flag: bool| {
        if s.is_empty() {
            return;
        }
        match segments.last_mut() {
            Some((last, f)) if *f == flag => last.push_str(s),
            _ => segments.push((s.to_string(), flag)),
        }
    };
    let mut pos = 0;
    for span in trainable {
        push(&text[pos..span.start], false);
        push(&text[span.clone()], true);
        pos = span.end;
    }
    push(&text[pos..], false);
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:25:09 UTC, a Friday, day 208 (as Python's strftime writes it).
        let t = 1_722_000_309;
        assert_eq!(strftime_utc(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(strftime_utc(t, "%Y-%m-%d %H:%M:%S"), "2024-07-26 13:25:09");
        assert_eq!(strftime_utc(t, "%A %B %-d, %j %I%p %%"), "Friday July 26, 208 01PM %");
        assert_eq!(strftime_utc(0, "%a %d %b %Y"), "Thu 01 Jan 1970");
        assert_eq!(strftime_utc(951_782_400, "%Y-%m-%d %A %j"), "2000-02-29 Tuesday 060");
    }

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

    #[test]
    fn end_of_turn_markers() {
        assert_eq!(ChatTemplate::builtin("chatml").unwrap().end_of_turn().unwrap(), "<|im_end|>");
        assert_eq!(ChatTemplate::builtin("llama3").unwrap().end_of_turn().unwrap(), "<|eot_id|>");
        // A final turn with extra text after the marker (Phi-3 ends the text with EOS).
        let phi3 = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}";
        let t = ChatTemplate::from_source(phi3.into(), "test".into(), None, Some("<|endoftext|>".into()))
            .unwrap();
        assert_eq!(t.end_of_turn().unwrap(), "<|end|>");
        // Llama 2: ` </s>` after the trimmed content, `<s>[INST]` before the next turn.
        let llama2 = "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token + '[INST] ' + m.content | trim + ' [/INST]' }}\
                      {% else %}{{ ' ' + m.content | trim + ' ' + eos_token }}{% endif %}{% endfor %}";
        let t =
            ChatTemplate::from_source(llama2.into(), "test".into(), Some("<s>".into()), Some("</s>".into()))
                .unwrap();
        assert_eq!(t.end_of_turn().unwrap(), " </s>");
        let msgs = [
            Message::new("user", "hi"),
            Message::new("assistant", " hello \n"),
            Message::new("user", "bye"),
            Message::new("assistant", "ciao"),
        ];
        let segs = render_segments(&t, &msgs.to_vec().into(), TrainOn::AssistantTurns).unwrap();
        let trained: Vec<&str> = segs.iter().filter(|s| s.1).map(|s| s.0.as_str()).collect();
        assert_eq!(trained, [" hello </s>", " ciao </s>"]);
    }

    #[test]
    fn first_word_and_prefix() {
        assert_eq!(first_word("<|im_end|>\n<|im_start|>"), "<|im_end|>");
        assert_eq!(first_word(" </s>"), " </s>");
        assert_eq!(first_word("\n\n"), "");
        assert_eq!(first_word(""), "");
        assert_eq!(common_prefix_len("aé b", "aé c"), 4);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
    }
}
