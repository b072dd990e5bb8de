//! `iop-gateway outbox list|show|replay`: what waits to go out, what went, what a partner refused — read from the store the configuration names, with dead letters sent back to the queue by hand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::store::{Message, MessageStatus, Store};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// Configuration file naming the store. Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml if it exists.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Folder of the embedded SQLite store (overrides store.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Messages, newest first.
    List {
        /// pending, in-flight, delivered or dead.
        #[arg(long)]
        status: Option<String>,
        /// Only this partner's.
        #[arg(long)]
        partner: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One message: its attempts (times, status codes, errors) and the partner's last answer.
    Show { id: String },
    /// Send a dead letter again: it goes back to pending with its original content.
    Replay { id: String },
}

pub fn run(args: Args) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iop-gateway outbox: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: Args) -> Result<(), String> {
    super::with_store(args.config.as_deref(), args.data_dir, async |_, store| command(store, args.command).await)
}

async fn command(store: &Store, command: Command) -> Result<(), String> {
    match command {
        Command::List { status, partner, limit } => {
            let status = status.map(|s| MessageStatus::parse(&s).ok_or(format!("unknown status '{s}' (pending, in-flight, delivered, dead)"))).transpose()?;
            let messages = store.messages(status, partner.as_deref(), limit).await.map_err(|e| e.to_string())?;
            println!("{:<36}  {:<10}  {:<20}  {:<12}  {:>8}  {:<24}  last", "id", "status", "partner", "kind", "attempts", "record");
            for m in &messages {
                println!("{}", line(m));
            }
            println!("{} message(s)", messages.len());
        }
        Command::Show { id } => {
            let (m, attempts) = store.message(&id).await.map_err(|e| e.to_string())?.ok_or(format!("no message '{id}'"))?;
            println!("{}", line(&m));
            println!("  subject     {}", m.new.subject);
            println!("  queued      {}", instant(m.created_at));
            if m.delivered_at > 0 {
                println!("  delivered   {}", instant(m.delivered_at));
            } else if m.status == MessageStatus::Pending {
                println!("  next try    {}", instant(m.next_attempt_at));
            }
            for a in &attempts {
                let status = if a.status_code == 0 { "no answer".to_string() } else { a.status_code.to_string() };
                println!("  attempt {:>3}  {}  {:>9}  {:>6} ms  {}", a.attempt, instant(a.at), status, a.duration_ms, a.error);
            }
            if !m.response.is_empty() {
                println!("  last answer {}", m.response);
            }
        }
        Command::Replay { id } => {
            if !store.replay(&id, crate::exchange::now_ms()).await.map_err(|e| e.to_string())? {
                return Err(format!("'{id}' is not a dead letter (only dead letters are replayed)"));
            }
            println!("{id} is pending again; a running gateway sends it within its poll interval");
        }
    }
    Ok(())
}

fn line(m: &Message) -> String {
    let last = if m.last_error.is_empty() { m.last_status.to_string() } else { format!("{} {}", m.last_status, m.last_error) };
    format!("{:<36}  {:<10}  {:<20}  {:<12}  {:>8}  {:<24}  {last}", m.new.id, m.status.as_str(), m.new.partner, m.new.kind, m.attempts, format!("{} {}", m.new.record_type, m.new.record_id))
}

/// A millisecond timestamp as an RFC 3339 instant.
fn instant(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}
