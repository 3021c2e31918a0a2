//! The balancing algorithms end to end: real upstreams, a real load balancer on
//! 127.0.0.1:0 choosing with each algorithm, real requests.

use loadbalancer::balancer::{Balancer, LeastRequest, RoundRobin, WeightedRoundRobin, Weights};

use crate::support::load::Load;
use crate::support::upstream::Fault;
use crate::support::{TestLb, Upstream, get, start_backends, tally};

/// Concurrent clients in the load tests: enough that requests pile up on a slow
/// backend, few enough for a shared two-core machine.
const CLIENTS: usize = 12;
/// Requests per client: bounds the run (at most 12 × 20 = 240 requests).
const PER_CLIENT: usize = 20;

/// Runs the bounded load through a load balancer over `upstreams` choosing with
/// `balancer`; returns the share of requests the slow `upstreams[0]` received.
async fn slow_share(upstreams: &[Upstream], balancer: impl Balancer + 'static) -> f64 {
    let before: Vec<usize> = upstreams.iter().map(Upstream::received).collect();
    let lb = TestLb::start_balanced(upstreams, balancer).await;
    let load = Load::start(lb.url("/"), CLIENTS, PER_CLIENT);
    load.wait_for_total(CLIENTS * PER_CLIENT).await;
    let report = load.stop().await;
    lb.stop().await;
    assert_eq!(report.succeeded, CLIENTS * PER_CLIENT, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    let received: Vec<usize> = upstreams
        .iter()
        .zip(before)
        .map(|(u, before)| u.received() - before)
        .collect();
    println!("received per backend (slow first): {received:?}");
    let total: usize = received.iter().sum();
    received[0] as f64 / total as f64
}

/// Bound asserted: least-request's slow share is under 0.6 × round-robin's.
/// Round-robin gives the slow backend a third whatever its speed; with two
/// random choices it loses every draw in which it has more requests in flight,
/// which is nearly always (in practice its share falls to a few percent).
#[tokio::test]
async fn least_request_sends_fewer_requests_to_a_slow_backend_than_round_robin() {
    let upstreams = start_backends(3).await;
    upstreams[0].set_fault(Fault::Slow);

    let round_robin = slow_share(&upstreams, RoundRobin::new()).await;
    let least_request = slow_share(&upstreams, LeastRequest::new()).await;
    println!("slow backend's share: round_robin={round_robin:.3} least_request={least_request:.3}");
    assert!(
        least_request < 0.6 * round_robin,
        "least_request {least_request:.3} vs round_robin {round_robin:.3}"
    );
}

#[tokio::test]
async fn weighted_round_robin_five_one_one_splits_seventy_requests_fifty_ten_ten_smoothly() {
    let upstreams = start_backends(3).await;
    // The balancer walks the list in address order; name the backends a, b, c
    // in that order and give a the weight 5.
    let mut by_addr: Vec<&Upstream> = upstreams.iter().collect();
    by_addr.sort_by_key(|u| u.addr);
    let heavy = by_addr[0].addr.to_string();
    let weights = Weights::from_map([(heavy.as_str(), 5)]).expect("valid weights");
    let lb = TestLb::start_balanced(&upstreams, WeightedRoundRobin::new(weights)).await;

    let mut order = String::new();
    for _ in 0..70 {
        let name = get(&lb.url("/")).await.pod_name();
        let position = by_addr
            .iter()
            .position(|u| u.pod_name == name)
            .expect("the answer names one of the upstreams");
        order.push(['a', 'b', 'c'][position]);
    }
    let counts = tally(order.chars().map(String::from));
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [50, 10, 10],
        "{counts:?}"
    );
    // nginx's smooth cycle for 5, 1, 1, ten times over; the longest run of a
    // is four (two at a cycle's end, two at the next one's start), never five.
    assert_eq!(order, "aabacaa".repeat(10));
    assert!(!order.contains("aaaaa"), "a burst of five: {order}");
    lb.stop().await;
}
