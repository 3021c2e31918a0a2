//! The `scale` benchmark: discovery and health checks with 10,000 endpoints.
//!
//! What `make bench SCENARIO=scale` runs. Two processes of this one program:
//!
//! * **the fake API server** (`--apiserver`, started by the other): the tests'
//!   fake Kubernetes API server (`tests/it/support/fake_apiserver.rs`, compiled
//!   in here), holding `--slices` EndpointSlices of `--endpoints-per-slice`
//!   endpoints each, on loopback addresses (127.1.x.y) on a port where nothing
//!   listens. It changes a slice when told to on its standard input. In a
//!   process of its own, so that its CPU and memory are not counted as ours.
//! * **the measured process**: a current-thread runtime on a thread named
//!   `balancer`, like the one the load balancer's `main` runs discovery and
//!   health checks on, running the real discovery (`watch_endpoint_slices`, a
//!   kube client from the fake server's kubeconfig) into a real backend list,
//!   and later the real health checker. Logging is the load balancer's own
//!   (`service_kit::logging`, `info`, text, to stdout), since discovery's log
//!   lines are part of what an update costs.
//!
//! It measures, in this order:
//!
//! 1. the first list: how long until all endpoints are in the backend list;
//! 2. `--updates` slice updates at `--rate` a second, each turning one endpoint
//!    not ready or ready again: the `balancer` thread's CPU time per update
//!    (`se.sum_exec_runtime` of `/proc/self/task/<tid>/sched`, falling back to
//!    the tick counts in `stat`), and for each update the time from telling the
//!    fake server until the backend list shows the change (polled from the main
//!    thread every 100 µs; p50, p99, max). That time includes the fake server
//!    encoding the event, a tenth of a millisecond;
//! 3. the cost of one pick at this size for each algorithm, through the calls the
//!    proxy makes (`pick_with_state` and `pick_nearest_for_attempt`), against a list of
//!    three backends, with every backend available and with none (the panic case);
//! 4. health checks at rest: the checker with `--health-interval-ms` over every
//!    endpoint (each probe is refused: nothing listens), given one interval per
//!    failure it takes to mark them all unhealthy, then the `balancer` thread's
//!    CPU over `--health-seconds`, as a share of one core on average and in its
//!    busiest 100 ms (a burst of probes shows there);
//! 5. VmRSS of the measured process before discovery starts, after the first
//!    list and at the end.
//!
//! Then it prints a markdown report, with the issue's targets (under 1 ms of CPU
//! per update, visible within 100 ms) marked met or not, to stderr and to
//! `--report`.
//!
//! ```sh
//! cargo run --release -p loadbalancer --example scale -- --report scale.md >scale.log
//! ```

// The fake server has more to offer than this program uses (stops, 410s, request
// records): its tests use the rest.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/support/fake_apiserver.rs"]
mod fake_apiserver;

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use fake_apiserver::{EndpointState, FakeApiServer, slice};
use kube::config::{KubeConfigOptions, Kubeconfig};
use loadbalancer::backends::{Backends, BackendsWriter};
use loadbalancer::balancer::{Algorithm, BalancerConfig, PickContext, pick_nearest_for_attempt};
use loadbalancer::discovery::KubernetesSource;
use loadbalancer::discovery::kubernetes::watch_endpoint_slices;
use loadbalancer::health::{HealthCheckConfig, HealthCheckSettings, HealthChecker};
use service_kit::logging::{self, LogFormat, LogLevel};
use tokio::sync::oneshot;

/// The Service whose slices the fake server holds.
const SERVICE: &str = "web";

/// The targets of issue 20, item 2.
const UPDATE_CPU_TARGET: Duration = Duration::from_millis(1);
const VISIBLE_TARGET: Duration = Duration::from_millis(100);

/// How long an update may take to show before it counts as lost.
const GIVE_UP: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(about = "Discovery and health checks at 10,000 endpoints, against the fake API server")]
struct Args {
    /// EndpointSlices of the Service.
    #[arg(long, default_value_t = 100)]
    slices: u32,
    /// Endpoints in each slice.
    #[arg(long, default_value_t = 100)]
    endpoints_per_slice: u32,
    /// Slice updates to time, each flipping one endpoint's readiness.
    #[arg(long, default_value_t = 300)]
    updates: u32,
    /// Slice updates per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of health checks at rest to measure (0: skip them).
    #[arg(long, default_value_t = 20)]
    health_seconds: u64,
    /// The health checks' interval.
    #[arg(long, default_value_t = 5000)]
    health_interval_ms: u64,
    /// Also write the report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Be the fake API server, with the slices on this port (the measured
    /// process starts it so).
    #[arg(long, hide = true)]
    apiserver: Option<u16>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.slices > 0 && args.endpoints_per_slice > 0 && args.updates > 0 && args.rate > 0.0,
        "--slices, --endpoints-per-slice, --updates and --rate must be positive"
    );
    let endpoints = args.slices * args.endpoints_per_slice;
    anyhow::ensure!(
        endpoints < 1 << 16,
        "at most 65,535 endpoints (127.1.0.0/16)"
    );
    if let Some(port) = args.apiserver {
        return serve_apiserver(&args, port);
    }
    logging::init(LogLevel::Info, LogFormat::Text)?;
    let port = unused_port()?;
    let mut service = Service::new(args.slices, args.endpoints_per_slice, port);
    let mut apiserver = ApiServer::start(&args, port)?;
    let rss_before = rss_kib("VmRSS");

    let balancer = BalancerThread::start()?;
    let writer = BackendsWriter::new();
    let backends = writer.reader();
    let source = KubernetesSource {
        namespace: None,
        service_name: SERVICE.to_owned(),
        port,
        grpc_port: None,
    };
    let kubeconfig = apiserver.kubeconfig.clone();
    let started = Instant::now();
    balancer.handle.spawn(async move {
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("the fake server's kubeconfig is valid");
        let client = kube::Client::try_from(config).expect("a client builds from it");
        let ended = watch_endpoint_slices(
            client,
            &source,
            &writer,
            tokio::sync::watch::channel(None).1,
        )
        .await;
        eprintln!("scale: discovery ended: {ended:?}");
    });
    say(&format!(
        "first list: {endpoints} endpoints in {} slices",
        args.slices
    ));
    let total = usize::try_from(endpoints)?;
    wait_until(GIVE_UP, || {
        backends.is_synced() && backends.with(<[_]>::len) == total
    })
    .context("the first list never arrived whole")?;
    let first_list = started.elapsed();
    let rss_listed = rss_kib("VmRSS");
    // Updates are timed through an open watch, not a re-list.
    let watching = Instant::now();
    while apiserver.ask("watches")? != "1" {
        anyhow::ensure!(watching.elapsed() < GIVE_UP, "no watch opened");
        std::thread::sleep(Duration::from_millis(1));
    }

    say(&format!(
        "{} slice updates at {}/s",
        args.updates, args.rate
    ));
    let updates = measure_updates(&args, &mut apiserver, &mut service, &backends)?;

    say("picks at this size");
    let picks = measure_picks(&backends);

    let health = if args.health_seconds > 0 {
        say(&format!(
            "health checks every {} ms; {} s to mark all unhealthy, then {} s measured",
            args.health_interval_ms,
            4 * args.health_interval_ms / 1000,
            args.health_seconds
        ));
        Some(measure_health(&args, &balancer, &backends)?)
    } else {
        None
    };
    let rss_end = rss_kib("VmRSS");
    let panic_picks = measure_picks(&backends);

    let report = report(
        &args,
        &Figures {
            first_list,
            updates,
            picks,
            panic_picks: health.is_some().then_some(panic_picks),
            health,
            rss_before,
            rss_listed,
            rss_end,
        },
    );
    eprintln!("\n{report}");
    if let Some(path) = &args.report {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    balancer.stop();
    apiserver.stop();
    Ok(())
}

/// The fake API server's side: serves the slices, and takes one command a line
/// on stdin (`flip SLICE ENDPOINT`, `compact`, `watches`, answered on stdout),
/// until stdin ends.
fn serve_apiserver(args: &Args, port: u16) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = runtime.block_on(FakeApiServer::start());
    let mut service = Service::new(args.slices, args.endpoints_per_slice, port);
    for index in 0..service.slices.len() {
        server.apply(service.slice(index));
    }
    // Watches start from the list's revision; the history is not needed.
    server.compact();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.kubeconfig_path().display())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["flip", s, e] => {
                let s: usize = s.parse()?;
                service.flip(s, e.parse()?);
                server.apply(service.slice(s));
            }
            ["compact"] => server.compact(),
            ["watches"] => {
                writeln!(out, "{}", server.open_watches())?;
                out.flush()?;
            }
            _ => anyhow::bail!("fake API server: unknown command {line:?}"),
        }
    }
    Ok(())
}

/// The fake API server's process, seen from the measured one.
struct ApiServer {
    child: Child,
    commands: ChildStdin,
    answers: BufReader<ChildStdout>,
    kubeconfig: Kubeconfig,
}

impl ApiServer {
    fn start(args: &Args, port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--slices", &args.slices.to_string()])
            .args([
                "--endpoints-per-slice",
                &args.endpoints_per_slice.to_string(),
            ])
            .args(["--apiserver", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fake API server")?;
        let commands = child.stdin.take().context("its stdin")?;
        let mut answers = BufReader::new(child.stdout.take().context("its stdout")?);
        let mut path = String::new();
        answers.read_line(&mut path)?;
        let kubeconfig = Kubeconfig::read_from(path.trim_end())
            .with_context(|| format!("reading the fake server's kubeconfig {path:?}"))?;
        Ok(Self {
            child,
            commands,
            answers,
            kubeconfig,
        })
    }

    fn tell(&mut self, command: &str) -> anyhow::Result<()> {
        writeln!(self.commands, "{command}")?;
        Ok(self.commands.flush()?)
    }

    fn ask(&mut self, question: &str) -> anyhow::Result<String> {
        self.tell(question)?;
        let mut answer = String::new();
        self.answers.read_line(&mut answer)?;
        Ok(answer.trim_end().to_owned())
    }

    /// Its CPU time so far, all threads.
    fn cpu(&self) -> Duration {
        process_cpu(&format!("/proc/{}/task", self.child.id()), None)
    }

    fn stop(mut self) {
        // The end of its stdin ends it.
        drop(self.commands);
        let _ = self.child.wait();
    }
}

fn say(what: &str) {
    eprintln!("==> scale: {what}");
}

/// A port on which nothing listens on any address, so every endpoint refuses
/// connections (a listener on 0.0.0.0 would take connections to 127.1.x.y too).
fn unused_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The Service's slices as the test holds them: endpoint `e` of slice `s` is
/// the `(s * per_slice + e + 1)`th address after 127.1.0.0.
struct Service {
    port: u16,
    /// Each slice's endpoints: address and state.
    slices: Vec<Vec<(String, EndpointState)>>,
}

impl Service {
    fn new(slices: u32, per_slice: u32, port: u16) -> Self {
        let base = u32::from(Ipv4Addr::new(127, 1, 0, 0));
        let slices = (0..slices)
            .map(|s| {
                (0..per_slice)
                    .map(|e| {
                        let ip = Ipv4Addr::from(base + s * per_slice + e + 1);
                        (ip.to_string(), EndpointState::Ready)
                    })
                    .collect()
            })
            .collect();
        Self { port, slices }
    }

    fn slice(&self, index: usize) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let endpoints: Vec<(&str, EndpointState)> = self.slices[index]
            .iter()
            .map(|(ip, state)| (ip.as_str(), *state))
            .collect();
        slice(
            &format!("{SERVICE}-{index:03}"),
            SERVICE,
            &endpoints,
            self.port,
        )
    }

    /// Flips endpoint `e` of slice `s` between ready and not ready; returns its
    /// address and whether it is now ready.
    fn flip(&mut self, s: usize, e: usize) -> (SocketAddr, bool) {
        let (ip, state) = &mut self.slices[s][e];
        *state = match state {
            EndpointState::Ready => EndpointState::NotReady,
            _ => EndpointState::Ready,
        };
        let ip = ip.parse().expect("the addresses made here parse");
        (
            SocketAddr::new(ip, self.port),
            *state == EndpointState::Ready,
        )
    }
}

/// The current-thread runtime that discovery and health checks run on, as in
/// the load balancer's `main`, driven by a thread of its own named `balancer`.
struct BalancerThread {
    handle: tokio::runtime::Handle,
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl BalancerThread {
    fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("balancer".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop,
            thread,
        })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// CPU time of this process's threads named `name` so far.
fn thread_cpu(name: &str) -> Duration {
    process_cpu("/proc/self/task", Some(name))
}

/// CPU time of the threads under `tasks` (a `/proc/<pid>/task`), all of them
/// or those named `name`.
fn process_cpu(tasks: &str, name: Option<&str>) -> Duration {
    let mut total = Duration::ZERO;
    let Ok(tasks) = std::fs::read_dir(tasks) else {
        return total;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.is_some_and(|name| comm.trim_end() != name) {
            continue;
        }
        total += sched_runtime(&dir.join("sched")).unwrap_or_else(|| stat_cpu(&dir.join("stat")));
    }
    total
}

/// `se.sum_exec_runtime` (milliseconds, to the nanosecond) where the kernel
/// keeps scheduler statistics.
fn sched_runtime(path: &std::path::Path) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("se.sum_exec_runtime"))?;
    let ms: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1000.0))
}

/// utime + stime from a `stat` file, at clock-tick resolution (10 ms).
fn stat_cpu(path: &std::path::Path) -> Duration {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Field 2 (the name) may hold spaces; count from its closing parenthesis.
    let rest = text.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// A `/proc/self/status` figure in KiB.
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Polls `done` every 100 µs until it holds; how long that took, or an error
/// after `limit`.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            anyhow::bail!("gave up after {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

struct Updates {
    /// The balancer thread's CPU per update.
    cpu: Duration,
    /// The fake server's thread's, for comparison (it encodes the events).
    apiserver_cpu: Duration,
    /// Times until visible, sorted.
    visible: Vec<Duration>,
}

fn measure_updates(
    args: &Args,
    apiserver: &mut ApiServer,
    service: &mut Service,
    backends: &Backends,
) -> anyhow::Result<Updates> {
    let pace = Duration::from_secs_f64(1.0 / args.rate);
    let per_slice = service.slices[0].len();
    let mut visible = Vec::new();
    let (cpu0, api0) = (thread_cpu("balancer"), apiserver.cpu());
    let mut next = Instant::now();
    for i in 0..usize::try_from(args.updates)? {
        let (s, e) = (
            i % service.slices.len(),
            (i / service.slices.len()) % per_slice,
        );
        let (addr, ready) = service.flip(s, e);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += pace;
        let sent = Instant::now();
        apiserver.tell(&format!("flip {s} {e}"))?;
        wait_until(GIVE_UP, || {
            backends.with(|list| list.binary_search(&addr).is_ok()) == ready
        })
        .with_context(|| format!("update {i} ({addr} ready: {ready}) never showed"))?;
        visible.push(sent.elapsed());
        // The watch has it, so the history can go: kept, it would grow the
        // fake server by every slice ever sent. (Before the watch has seen it,
        // compacting would send the watch back to a re-list.)
        apiserver.tell("compact")?;
    }
    let n = args.updates;
    let cpu = (thread_cpu("balancer") - cpu0) / n;
    let apiserver_cpu = (apiserver.cpu() - api0) / n;
    visible.sort_unstable();
    Ok(Updates {
        cpu,
        apiserver_cpu,
        visible,
    })
}

/// Nanoseconds per pick, at this list's size and at three backends, per algorithm.
type Picks = Vec<(Algorithm, f64, f64)>;

fn measure_picks(backends: &Backends) -> Picks {
    let three = Backends::new(
        (1..=3)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 80)))
            .collect(),
    );
    // Like the large list: after the health checks, none is healthy.
    let unhealthy = backends.states().iter().all(|(_, s)| !s.is_healthy());
    for (_, state) in three.states() {
        state.set_healthy(!unhealthy);
    }
    [
        Algorithm::RoundRobin,
        Algorithm::LeastRequest,
        Algorithm::WeightedRoundRobin,
    ]
    .into_iter()
    .map(|algorithm| {
        let balancer = BalancerConfig {
            algorithm,
            ..BalancerConfig::default()
        }
        .build();
        let time = |list: &Backends| {
            let mut picks = 0u32;
            let start = Instant::now();
            // At least 300 ms and 1,000 picks: a slow algorithm still gets a figure.
            while picks < 1_000 || start.elapsed() < Duration::from_millis(300) {
                for _ in 0..100 {
                    let now = Instant::now();
                    let picked = list.pick_with_state(now, |near, addrs, available, in_flight| {
                        let keyless = PickContext::default();
                        pick_nearest_for_attempt(
                            &*balancer,
                            near,
                            addrs,
                            available,
                            in_flight,
                            &[],
                            &keyless,
                        )
                    });
                    std::hint::black_box(picked.ok());
                }
                picks += 100;
            }
            start.elapsed().as_secs_f64() * 1e9 / f64::from(picks)
        };
        (algorithm, time(backends), time(&three))
    })
    .collect()
}

struct Health {
    /// Average share of a core over the window.
    average: f64,
    /// The busiest 100 ms of the window, as a share of a core.
    busiest: f64,
    /// Backends marked unhealthy at the end (all of them, if probes ran).
    unhealthy: usize,
    total: usize,
    window: Duration,
}

fn measure_health(
    args: &Args,
    balancer: &BalancerThread,
    backends: &Backends,
) -> anyhow::Result<Health> {
    let settings = HealthCheckSettings::from(&HealthCheckConfig {
        interval_ms: args.health_interval_ms,
        ..HealthCheckConfig::default()
    });
    let interval = settings.interval;
    // Three failures mark a backend unhealthy; the first round begins an
    // interval after start and takes one.
    let settle = interval * (settings.unhealthy_threshold + 1);
    balancer
        .handle
        .spawn(HealthChecker::new(backends.clone(), settings).run());
    std::thread::sleep(settle);
    let window = Duration::from_secs(args.health_seconds);
    let slot = Duration::from_millis(100);
    let start = Instant::now();
    let first = thread_cpu("balancer");
    let (mut last, mut busiest) = (first, Duration::ZERO);
    let mut next = start + slot;
    while next <= start + window {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let now = thread_cpu("balancer");
        busiest = busiest.max(now - last);
        last = now;
        next += slot;
    }
    let elapsed = start.elapsed();
    let unhealthy = backends
        .states()
        .iter()
        .filter(|(_, state)| !state.is_healthy())
        .count();
    Ok(Health {
        average: (last - first).as_secs_f64() / elapsed.as_secs_f64(),
        busiest: busiest.as_secs_f64() / slot.as_secs_f64(),
        unhealthy,
        total: backends.with(<[_]>::len),
        window: elapsed,
    })
}

struct Figures {
    first_list: Duration,
    updates: Updates,
    picks: Picks,
    /// The same with every backend unhealthy, after the health checks.
    panic_picks: Option<Picks>,
    health: Option<Health>,
    rss_before: u64,
    rss_listed: u64,
    rss_end: u64,
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank: the smallest value with at least p of them at or below it.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

fn report(args: &Args, figures: &Figures) -> String {
    let endpoints = args.slices * args.endpoints_per_slice;
    let updates = &figures.updates;
    let p50 = percentile(&updates.visible, 0.50);
    let p99 = percentile(&updates.visible, 0.99);
    let max = updates.visible.last().copied().unwrap_or_default();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### scale: {endpoints} endpoints in {} EndpointSlices, {} slice updates at {}/s, against the fake API server\n",
        args.slices, args.updates, args.rate
    );
    let _ = writeln!(out, "| measure | ours | target | |");
    let _ = writeln!(out, "|---|--:|--:|---|");
    let _ = writeln!(
        out,
        "| CPU per slice update (discovery's thread) | {} | under {} | {} |",
        ms(updates.cpu),
        ms(UPDATE_CPU_TARGET),
        met(updates.cpu < UPDATE_CPU_TARGET)
    );
    let _ = writeln!(
        out,
        "| time until the balancer's list shows an update: p50 | {} | | |",
        ms(p50)
    );
    let _ = writeln!(
        out,
        "| p99 (max {}) | {} | under {} | {} |",
        ms(max),
        ms(p99),
        ms(VISIBLE_TARGET),
        met(p99 < VISIBLE_TARGET)
    );
    let _ = writeln!(
        out,
        "| first list of {endpoints} endpoints in the balancer after | {} | | |",
        ms(figures.first_list)
    );
    if let Some(health) = &figures.health {
        let _ = writeln!(
            out,
            "| health checks at rest, every {} ms ({} of {} unhealthy): CPU, share of a core | {:.1} % | | |",
            args.health_interval_ms,
            health.unhealthy,
            health.total,
            health.average * 100.0
        );
        let _ = writeln!(
            out,
            "| the same in the busiest 100 ms of {:.0} s | {:.1} % | | |",
            health.window.as_secs_f64(),
            health.busiest * 100.0
        );
    }
    let _ = writeln!(
        out,
        "| VmRSS: before discovery, after the first list, at the end | {:.1} / {:.1} / {:.1} MiB | | |",
        mib(figures.rss_before),
        mib(figures.rss_listed),
        mib(figures.rss_end)
    );
    let _ = writeln!(
        out,
        "\nThe fake API server (another process) spent {} per update encoding and sending it, not counted above.\n",
        ms(updates.apiserver_cpu)
    );
    let _ = writeln!(
        out,
        "Cost of one pick (the proxy's `pick_with_state` and `pick_nearest_for_attempt`), every backend available{}:\n",
        if figures.panic_picks.is_some() {
            ", and with every one unhealthy (after the health checks: the proxy then picks among all)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| algorithm | ns per pick at {endpoints} | at 3 |{}",
        if figures.panic_picks.is_some() {
            format!(" all unhealthy, at {endpoints} | at 3 |")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "|---|--:|--:|{}",
        if figures.panic_picks.is_some() {
            "--:|--:|"
        } else {
            ""
        }
    );
    for (i, (algorithm, large, small)) in figures.picks.iter().enumerate() {
        let _ = write!(out, "| {algorithm} | {large:.0} | {small:.0} |");
        if let Some((_, large, small)) = figures.panic_picks.as_ref().and_then(|p| p.get(i)) {
            let _ = write!(out, " {large:.0} | {small:.0} |");
        }
        let _ = writeln!(out);
    }
    out
}
