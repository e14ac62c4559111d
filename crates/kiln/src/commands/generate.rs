//! Streaming text generation in the terminal: `kiln predict LLM -i prompt=...`
//! prints tokens as they come, and `kiln chat LLM` holds a conversation,
//! both through the same engine the server uses.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use kiln_pipelines::text_generation::generation_request;
use kiln_textgen::{GenerationEvent, TextGeneration};
use serde_json::{Map, Value, json};

/// Stream one request's text to stdout; returns the whole text.
pub fn stream_to_terminal(
    engine: &Arc<dyn TextGeneration>,
    fields: &Map<String, Value>,
) -> Result<String> {
    let request = generation_request(engine.model(), fields)?;
    let prompt_tokens = request.prompt_ids.len();
    let started = Instant::now();
    let mut stream = engine.submit(request)?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { text: piece, .. } => {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
                text.push_str(&piece);
            }
            GenerationEvent::Finished {
                text: rest,
                reason,
                completion_tokens,
                ..
            } => {
                out.write_all(rest.as_bytes())?;
                writeln!(out)?;
                out.flush()?;
                text.push_str(&rest);
                let total = started.elapsed().as_secs_f64();
                let rate = completion_tokens as f64 / total.max(1e-9);
                eprintln!(
                    "[{}: {prompt_tokens} prompt + {completion_tokens} generated tokens in {total:.2} s, {rate:.1} tokens/s]",
                    reason.as_str()
                );
                return Ok(text);
            }
            GenerationEvent::Failed(e) => bail!(e),
        }
    }
    bail!("the generation engine stopped")
}

#[derive(Args)]
pub struct ChatArgs {
    /// Model reference (`models:/name@alias`, a name, a model folder or a .gguf file).
    model: String,
    /// A system message for the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Sampling and length fields as KEY=VALUE (`-i temperature=0.7 -i max_tokens=256`).
    #[arg(short = 'i', long = "input")]
    inputs: Vec<String>,
}

/// `kiln chat`: read a line, answer it, remember both; `/reset` forgets,
/// `/exit` or end of input stops.
pub fn chat(home: &Path, args: ChatArgs) -> Result<()> {
    let resolved =
        crate::resolve::resolve_model(&kiln_registry::Registry::open(home), &args.model)?;
    let pipeline = kiln_pipelines::load_pipeline(&resolved)?;
    let Some(engine) = pipeline.text_generation() else {
        bail!(
            "{} does not generate text (its pipeline is {})",
            args.model,
            pipeline.interface().pipeline
        );
    };
    if engine.model().template.is_none() {
        bail!(
            "{} has no chat template; use `kiln predict {} -i prompt=...`",
            args.model,
            args.model
        );
    }
    let options = super::predict::pairs(&args.inputs, "inputs")?;
    let mut messages: Vec<Value> = Vec::new();
    let reset = |messages: &mut Vec<Value>| {
        messages.clear();
        if let Some(system) = &args.system {
            messages.push(json!({"role": "system", "content": system}));
        }
    };
    reset(&mut messages);
    eprintln!(
        "chatting with {} (/reset to start over, /exit or Ctrl-D to stop)",
        args.model
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                reset(&mut messages);
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": line}));
        let mut fields = options.clone();
        fields.insert("messages".into(), Value::Array(messages.clone()));
        match stream_to_terminal(&engine, &fields) {
            Ok(reply) => messages.push(json!({"role": "assistant", "content": reply})),
            Err(e) => {
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
}
