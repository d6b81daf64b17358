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

mod jinja;
mod messages;
mod template;

pub use messages::{
    map_role, parse_conversation, Conversation, Message, ToolCall, DEFAULT_MESSAGES_FIELDS,
    FUNCTION_CALL_ROLE, ROLE_NAMES, SYSTEM_FIELD, TOOLS_FIELD,
};
pub use template::ChatTemplate;

use crate::config::TrainOn;
use anyhow::{anyhow, bail, Result};
use jinja::py_json;
use std::ops::Range;

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
                template.origin(),
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
                template.origin()
            );
        }
    }
    if let Some(i) = messages.iter().position(|m| m.reasoning_content.is_some()) {
        if !template.source().contains("reasoning_content") {
            bail!(
                "the chat template from {} never reads `reasoning_content`, so the reasoning of \
                 message {} would be lost; use a template that renders it (Qwen3's does) or \
                 leave the reasoning out of the data",
                template.origin(),
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
                template.origin()
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
                template.origin(),
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
                template.origin()
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
        template.origin()
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
        TrainOn::Last => match spans.len() {
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
        let segs = render_segments(&t, &msgs.to_vec().into(), TrainOn::Assistant).unwrap();
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
