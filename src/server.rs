//! Running the gateway: open the store, bind the listener (plain TCP or TLS with optional client certificates), serve the router over our own bounded accept loop, and on a shutdown signal stop accepting, drain in-flight requests and close the store.
//!
//! [`start`] takes an already validated configuration and returns a handle, so the command line,
//! the tests (port 0) and the benchmark all run the same server. The accept loop is ours rather than
//! `axum::serve` because that offers neither a time limit on request heads nor a bound on connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use tower::ServiceExt as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::api::{self, AppState};
use crate::config::{Loaded, TlsConfig};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("the store cannot be opened: {0}")]
    Store(#[from] StoreError),
    #[error("the exchange cannot start: {0}")]
    Exchange(String),
    #[error("the server failed: {0}")]
    Serve(io::Error),
}

/// Installs aws-lc-rs as the process's rustls provider (rustls panics at first use if two providers are linked and none is chosen).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Builds the rustls server configuration from PEM files; with `client_ca`, clients must present a certificate it issued.
pub fn tls_server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    install_crypto_provider();
    let err = |what: &str, e: &dyn std::fmt::Display| ServeError::Tls(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| err(&tls.cert.display().to_string(), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&tls.cert.display().to_string(), &e))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!("{}: no certificate", tls.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| err(&tls.key.display().to_string(), &e))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| err(&ca.display().to_string(), &e))? {
                roots.add(cert.map_err(|e| err(&ca.display().to_string(), &e))?).map_err(|e| err(&ca.display().to_string(), &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(|e| err("client CA", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| err("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS listener: TCP connections are accepted in the background and their handshakes run
/// concurrently, so one slow or hostile client cannot hold up the others.
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, incoming) = mpsc::channel(64);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "Accepting a connection failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(error = %e, "TLS handshake failed."),
                        Err(_) => tracing::info!("TLS handshake timed out."),
                    }
                });
            }
        });
        Ok(TlsListener { incoming, local, acceptor_task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The peer address of a connection, for either listener (audit records it).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// The local address a connection reached (with a wildcard listener, the interface the client
/// used): the one address a request's `Host` can be checked against.
#[derive(Clone, Copy, Debug)]
pub struct LocalAddr(pub SocketAddr);

/// The local address of an accepted connection, for either listener.
pub trait ConnectionAddr {
    fn local(&self) -> Option<SocketAddr>;
}

impl ConnectionAddr for TcpStream {
    fn local(&self) -> Option<SocketAddr> {
        self.local_addr().ok()
    }
}

impl ConnectionAddr for TlsStream<TcpStream> {
    fn local(&self) -> Option<SocketAddr> {
        self.get_ref().0.local_addr().ok()
    }
}

/// What the accept loop needs besides the listener.
struct Serving {
    app: axum::Router,
    state: AppState,
    /// One permit per open connection.
    connections: Arc<tokio::sync::Semaphore>,
    header_timeout: Duration,
}

/// Accepts connections until `signal` resolves, each holding a connection permit, and serves each
/// with HTTP/1.1 (as `axum::serve` did; TLS offers only `http/1.1`). After the signal, open
/// connections finish their request in flight and close; this resolves when all of them have.
async fn serve<L>(mut listener: L, serving: Serving, signal: impl Future<Output = ()> + Send + 'static) -> io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + ConnectionAddr + Unpin + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a clone of `open_rx`; `open_tx.closed()` resolves when all ended.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    tokio::pin!(signal);
    loop {
        let permit = tokio::select! {
            permit = serving.connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut signal => break,
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut signal => break,
        };
        let (app, state, mut stop, open) = (serving.app.clone(), serving.state.clone(), stop_rx.clone(), open_rx.clone());
        let header_timeout = serving.header_timeout;
        let local = io.local();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = open;
            let refusal_state = state.clone();
            let guarded = api::connection::GuardedIo::new(
                io,
                Box::new(move |status| {
                    let state = refusal_state.clone();
                    tokio::spawn(async move { api::audit_protocol_refusal(&state, peer, status, "the request could not be parsed").await });
                }),
            );
            let unanswered = guarded.unanswered.clone();
            let service = hyper_util::service::TowerToHyperService::new(app.map_request(move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(PeerAddr(peer)));
                if let Some(local) = local {
                    request.extensions_mut().insert(LocalAddr(local));
                }
                request
            }));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(guarded), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = async { stop.wait_for(|stopping| *stopping).await.map(|_| ()) } => {
                    connection.as_mut().graceful_shutdown();
                    connection.as_mut().await
                }
            };
            if let Err(e) = result
                && e.is_timeout()
                && unanswered.load(std::sync::atomic::Ordering::Relaxed)
            {
                // A head that began but did not end in time: the client is dropped without an answer (it
                // never finished asking), and the refusal is audited.
                let description = format!("the request head did not arrive within {} s; the connection was closed", header_timeout.as_secs());
                api::audit_protocol_refusal(&state, peer, 408, &description).await;
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// A running server.
pub struct Running {
    pub local_addr: SocketAddr,
    pub base_url: String,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to the configured grace time) and closes the store.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.map_err(|e| ServeError::Serve(io::Error::other(e.to_string())))?
    }

    /// Waits until the server ends (after a shutdown signal passed to [`start`]).
    pub async fn wait(self) -> Result<(), ServeError> {
        let Running { stop, task, .. } = self;
        let result = task.await.map_err(|e| ServeError::Serve(io::Error::other(e.to_string())))?;
        drop(stop);
        result
    }
}

/// Opens the store, binds the configured address and starts serving. `shutdown` resolving (or
/// [`Running::shutdown`]) stops the server gracefully.
pub async fn start(loaded: Loaded, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<Running, ServeError> {
    install_crypto_provider();
    let tls = loaded.config.server.tls.as_ref().map(tls_server_config).transpose()?;
    let metrics = Arc::new(Metrics::default());
    let store = Store::open(&loaded.config.store, metrics.clone()).await?;
    let validator = api::state::default_validator();
    let exchange = exchange(&loaded, &validator)?;
    let tcp = TcpListener::bind(loaded.listen).await.map_err(|source| ServeError::Bind { addr: loaded.listen, source })?;
    let local_addr = tcp.local_addr().map_err(ServeError::Serve)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = loaded.config.server.base_url.clone().unwrap_or_else(|| format!("{scheme}://{local_addr}"));
    let grace = Duration::from_secs(loaded.config.server.shutdown_grace_secs);
    let warning = loaded.base_url_warning();
    let serving = Serving {
        connections: Arc::new(tokio::sync::Semaphore::new(loaded.config.server.max_connections)),
        header_timeout: Duration::from_secs(loaded.config.server.header_read_timeout_secs),
        state: AppState::new(loaded, base_url.clone(), store.clone(), metrics.clone(), validator, exchange),
        app: axum::Router::new(),
    };
    let serving = Serving { app: api::router(serving.state.clone()), ..serving };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        tokio::select! {
            _ = shutdown => {},
            _ = stop_rx => {},
        }
    };
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        stopped.await;
        tracing::info!("Shutting down: no new connections; draining requests in flight.");
        let _ = drain_tx.send(());
    };
    let purge_store = store.clone();
    let purger = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            if let Err(e) = purge_store.purge_expired(crate::api::caller::now_secs()).await {
                tracing::warn!(error = %e, "Purging expired tokens failed.");
            }
        }
    });
    let worker = serving.state.loaded.config.outbox.enabled.then(|| crate::exchange::outbox::spawn(serving.state.clone()));
    let exporter = serving.state.loaded.config.export.enabled.then(|| crate::export::spawn(serving.state.clone()));
    // Inquiries are outbox messages: an instance that sends none has no business queueing them.
    let inquirer = serving.state.loaded.config.outbox.enabled.then(|| crate::exchange::inquiry::spawn(serving.state.clone()));
    // Heartbeats are outbox messages too.
    let heart = serving.state.loaded.config.outbox.enabled.then(|| crate::exchange::topics::spawn(serving.state.clone()));
    let serving: tokio::task::JoinHandle<io::Result<()>> = match tls {
        Some(config) => {
            let listener = TlsListener::new(tcp, config).map_err(ServeError::Serve)?;
            tokio::spawn(serve(listener, serving, signal))
        }
        None => tokio::spawn(serve(tcp, serving, signal)),
    };
    tracing::info!(address = %local_addr, base_url = %base_url, backend = store.backend().as_str(), "Serving FHIR.");
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let closing_store = store.clone();
    let task = tokio::spawn(async move {
        let mut serving = serving;
        let result = tokio::select! {
            result = &mut serving => Some(result),
            _ = drain_rx => None,
        };
        let result = match result {
            Some(result) => result,
            None => match tokio::time::timeout(grace, &mut serving).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(grace_secs = grace.as_secs(), "Requests still in flight after the grace time; stopping them.");
                    serving.abort();
                    Ok(Ok(()))
                }
            },
        };
        purger.abort();
        // A message in flight when the worker stops is sent again after its lease, with the same identity.
        if let Some(worker) = worker {
            worker.abort();
        }
        if let Some(inquirer) = inquirer {
            inquirer.abort();
        }
        if let Some(heart) = heart {
            heart.abort();
        }
        // An export stopped mid-page is resumed from its committed cursor after its lease, by any instance.
        if let Some(exporter) = exporter {
            exporter.abort();
        }
        closing_store.close().await;
        tracing::info!("Stopped; the store is closed.");
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Serve(e)),
            Err(e) => Err(ServeError::Serve(io::Error::other(e.to_string()))),
        }
    });
    Ok(Running { local_addr, base_url, store, metrics, stop: Some(stop_tx), task })
}

/// Loads the mappings (the configured folder, else those compiled in) and sets up the partners, before anything binds.
fn exchange(loaded: &Loaded, validator: &crate::validation::Validator) -> Result<api::state::Exchange, ServeError> {
    let definitions = validator.definitions();
    let mappings = match &loaded.config.mappings.dir {
        Some(dir) => crate::mapping::MappingSet::load(dir, definitions),
        None => crate::mapping::MappingSet::bundled(definitions),
    }
    .map_err(|e| ServeError::Exchange(e.to_string()))?;
    let partners = crate::partner::Partners::new(&loaded.config).map_err(|e| ServeError::Exchange(e.to_string()))?;
    let labels = crate::auth::labelling::LabelRules::load(loaded.config.mappings.labels.as_deref()).map_err(|e| ServeError::Exchange(format!("the label rules: {e}")))?;
    Ok(api::state::Exchange { mappings: Arc::new(mappings), partners: Arc::new(partners), labels })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
