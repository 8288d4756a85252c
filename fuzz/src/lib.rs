//! What every decoder fuzz target checks.

use mamori_protocol::codec::{decode_all, Decoder, Stream, StreamEvent};

/// Decode `data` whole and split at a point taken from its first byte; never panic, always
/// advance, and agree on the items.
pub fn check<D: Decoder>(make: impl Fn() -> D, data: &[u8])
where
    D::Item: core::fmt::Debug,
{
    let whole: Vec<String> = decode_all(make(), data)
        .into_iter()
        .filter_map(|e| match e {
            StreamEvent::Item { item, .. } => Some(format!("{item:?}")),
            StreamEvent::Error { error, .. } => {
                assert!(error.skip >= 1);
                None
            }
        })
        .collect();
    let cut = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut stream = Stream::new(make());
    let mut split = Vec::new();
    for part in [&data[..cut], &data[cut..]] {
        stream.push(part);
        while let Some(ev) = stream.next_event() {
            split.extend(ev.item().map(|i| format!("{i:?}")));
        }
    }
    assert_eq!(whole, split);
}
