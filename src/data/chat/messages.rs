//! Records → [`Conversation`]s: OpenAI and ShareGPT turns, content parts, tool calls and tools.

use super::jinja::dict;
use crate::data::source::lookup;
use crate::files::kind_name;
use anyhow::{anyhow, bail, Result};
use minijinja::value::{Serde, Value as JValue, ValueKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

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
    let at = format!("{}:{row}", file.display());
    let (column, turns) = find_turns(&at, fields, messages_field)?;
    let tools = match lookup(fields, tools_field) {
        Some(value) => parse_tools(value).map_err(|why| anyhow!("{at}: `{tools_field}`: {why}"))?,
        None => None,
    };
    let mut messages = Vec::with_capacity(turns.len() + 1);
    messages.extend(system_field(&at, fields)?);
    for (i, turn) in turns.iter().enumerate() {
        let which = format!("message {} of `{column}`", i + 1);
        let message = parse_message(turn, &which).map_err(|why| anyhow!("{at}: {why}"))?;
        if message.role == "system" && i == 0 && !messages.is_empty() {
            bail!(
                "{at}: the row has both a `{SYSTEM_FIELD}` field and a system message in \
                 `{column}`; keep one"
            );
        }
        messages.push(message);
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("{at}: the conversation in `{column}` has no assistant turn, so nothing to train on");
    }
    Ok(Conversation { messages, tools })
}

/// The column holding the conversation and its non-empty list of turns; `at` is "file:row".
fn find_turns<'a>(
    at: &str,
    fields: &'a Map<String, Value>,
    messages_field: Option<&'a str>,
) -> Result<(&'a str, &'a [Value])> {
    let present = || {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        if names.is_empty() {
            "no fields".to_string()
        } else {
            names.join(", ")
        }
    };
    let (column, list) = match messages_field {
        Some(name) => match lookup(fields, name) {
            Some(v) => (name, v),
            None => {
                bail!("{at}: the row has no `{name}` field with the conversation (it has: {})", present())
            }
        },
        None => match DEFAULT_MESSAGES_FIELDS.iter().find_map(|name| fields.get(*name).map(|v| (*name, v))) {
            Some(found) => found,
            None => bail!(
                "{at}: the row has neither a `messages` nor a `conversations` field with the \
                 conversation (it has: {}); name the column holding it in the data config",
                present()
            ),
        },
    };
    let turns = match list {
        Value::Array(turns) => turns,
        other => bail!("{at}: `{column}` must be a list of messages, found {}", kind_name(other)),
    };
    if turns.is_empty() {
        bail!("{at}: `{column}` is an empty conversation");
    }
    Ok((column, turns))
}

/// The system message of the top-level [`SYSTEM_FIELD`], if the row has a non-empty one.
fn system_field(at: &str, fields: &Map<String, Value>) -> Result<Option<Message>> {
    match fields.get(SYSTEM_FIELD) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(Message::new("system", s))),
        Some(other) => bail!("{at}: the `{SYSTEM_FIELD}` field must be a string, found {}", kind_name(other)),
    }
}

/// One turn of the list as a message, or why not; `which` names the turn ("message 3 of
/// `messages`").
fn parse_message(turn: &Value, which: &str) -> std::result::Result<Message, String> {
    let obj = match turn {
        Value::Object(obj) => obj,
        other => {
            return Err(format!(
                "{which} must be an object with role and content, found {}",
                kind_name(other)
            ))
        }
    };
    let role_key = if obj.contains_key("role") { "role" } else { "from" };
    let role_name = match obj.get(role_key) {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(format!("{which}: `{role_key}` must be a string, found {}", kind_name(other)))
        }
        None => return Err(format!("{which} has neither a `role` nor a `from` key")),
    };
    let Some(role) = map_role(role_name) else {
        let accepted: Vec<&str> = ROLE_NAMES.iter().map(|(from, _)| *from).collect();
        return Err(format!(
            "{which} has the unknown role `{role_name}` (accepted: {})",
            accepted.join(", ")
        ));
    };
    parse_turn(role, role_name, obj).map_err(|why| format!("{which} ({role_name}): {why}"))
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
