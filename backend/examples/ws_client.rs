//! A WebSocket client for the backend's `/ws` echo, straight to a backend or
//! through the load balancer: it connects, prints the first message (the identity
//! of the pod it reached), sends each further argument as a text message and
//! prints the echo, then closes the session.
//!
//! ```sh
//! cargo run -p backend --example ws_client -- ws://localhost:8080/ws hello world
//! ```
//!
//! Lines starting `<` came from the server, `>` went to it.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const USAGE: &str = "usage: ws_client [ws://HOST:PORT/ws] [MESSAGE ...]";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ws_client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://localhost:8080/ws".to_owned());
    if !url.starts_with("ws://") {
        bail!("{USAGE}");
    }
    let mut messages: Vec<String> = args.collect();
    if messages.is_empty() {
        messages.push("hello".to_owned());
    }

    let (mut ws, _) = connect_async(url.as_str())
        .await
        .with_context(|| format!("opening a WebSocket to {url}"))?;
    println!("< {}", next_text(&mut ws).await?);
    for message in messages {
        println!("> {message}");
        ws.send(Message::text(message)).await?;
        println!("< {}", next_text(&mut ws).await?);
    }
    ws.close(None).await?;
    // The session is over when the server has answered the Close frame.
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

/// The next text message, skipping the server's pings.
async fn next_text(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> anyhow::Result<String> {
    loop {
        match ws.next().await.context("the server ended the session")?? {
            Message::Text(text) => return Ok(text.to_string()),
            Message::Ping(_) | Message::Pong(_) => {}
            other => bail!("expected a text message, got {other:?}"),
        }
    }
}
