//! The dashboard: server-rendered pages in Japanese (default) or English, usable on a phone
//! and without JavaScript.
//!
//! With JavaScript, `/static/app.js` listens to `/events` (server-sent events) and, when one
//! of the user's homes changes, fetches the same page again and swaps its `<main>` (unless
//! the user is typing in a form there). It also refreshes once a minute, because time left
//! changes with time alone. Without JavaScript the pages are complete; they are only not
//! live. The stream is scoped like the pages: it says nothing about homes the user cannot see.
//!
//! Nothing is loaded from anywhere but the gateway (CSS, JS and charts are served or inline
//! SVG; the CSP header forbids anything else), so the dashboard works on a network cut off
//! from the internet, as in a disaster.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use serde::Deserialize;

use super::auth::{local_path, Viewer};
use super::view::{self, AlertView, HomeView};
use super::{escape, App, Client, WebRequest};
use crate::accounts::{self, AccountRole, Accounts};
use crate::audit;
use crate::engine::{Engine, Time};
use crate::homes::Lang;
use crate::message::{basis, kind_text, role_text, tier_text};

/// Translations.
#[derive(Debug, Clone, Copy)]
pub struct T(pub Lang);

const WORDS: &[(&str, &str, &str)] = &[
    ("subtitle", "医療的ケア児の電源見守り", "Power watch for children on home ventilation"),
    ("username", "ユーザー名", "Username"),
    ("password", "パスワード", "Password"),
    ("totp_code", "確認コード（設定している場合）", "Authenticator code (if set up)"),
    ("login", "ログイン", "Log in"),
    ("logout", "ログアウト", "Log out"),
    ("login_failed", "ユーザー名、パスワード、または確認コードが違います。", "Wrong username, password or code."),
    ("throttled", "失敗が続いたため、約{n}分間ログインできません。", "Too many failures: try again in about {n} min."),
    (
        "unavailable",
        "一時的に利用できません。少し待ってからもう一度お試しください。",
        "Temporarily unavailable: please try again in a moment.",
    ),
    ("busy", "ただいま混み合っています。少し待ってからもう一度お試しください。", "Busy: please try again in a moment."),
    (
        "password_throttled",
        "現在のパスワードの確認に何度も失敗したため、しばらく変更できません。",
        "Too many wrong current passwords: try again later.",
    ),
    ("password_wrong", "現在のパスワードが違います。", "The current password is wrong."),
    ("form_expired", "フォームの有効期限が切れました。もう一度お試しください。", "The form expired: try again."),
    ("overview", "概況", "Overview"),
    ("alerts", "通知", "Alerts"),
    ("account", "アカウント", "Account"),
    ("users", "ユーザー管理", "Users"),
    ("audit", "監査ログ", "Audit log"),
    ("delivery", "配信状況", "Delivery"),
    (
        "delivery_intro",
        "保存期間内の通知の配信状況（経路と受け手ごと）と、確認までの時間です。",
        "Notifications within the retention, by channel and reader, and how long each reader takes to acknowledge.",
    ),
    ("reader", "受け手", "Reader"),
    ("spo2_pulse", "SpO2・脈拍", "SpO2 and pulse"),
    ("totp_short", "・二段階認証", " · two-factor"),
    ("drill", "訓練", "Drill"),
    ("drill_intro", "この世帯のすべての連絡先に「訓練」と明記したテスト通知を送ります。誰に届き、誰が確認したかは、この画面の通知の履歴に表示されます。", "Sends every contact of this home a test message marked as a drill. Who received it and who acknowledged shows in this page's alert history."),
    ("drill_start", "訓練の通知を送る", "Send a drill"),
    ("drill_forbidden", "訓練を始められるのは、コーディネーターと管理者です。", "Only coordinators and administrators can start a drill."),
    ("failed_attempts", "失敗した試行", "Failed attempts"),
    ("acknowledged_count", "確認した通知", "Acknowledged"),
    ("ack_median", "確認までの時間（中央値）", "Time to acknowledge (median)"),
    ("no_deliveries", "まだ通知はありません。", "No notifications yet."),
    ("incident", "広域停電", "Regional outage"),
    ("incident_over", "この広域停電は終わりました", "This regional outage is over"),
    ("contacts", "連絡先", "Contacts"),
    ("no_phone", "電話番号の登録なし", "no phone number on file"),
    ("ended", "終了", "Ended"),
    ("homes_in_it", "対象の家庭", "Homes in it"),
    ("home", "世帯", "Home"),
    ("power", "電源", "Power"),
    ("mains", "商用電源", "Mains"),
    ("battery", "予備電源", "Battery"),
    ("unknown", "不明", "Unknown"),
    ("time_left", "残り時間", "Time left"),
    ("last_battery", "人工呼吸器の内蔵電池のみ", "ventilator's own battery only"),
    ("online", "通信中", "Online"),
    ("silent", "通信途絶", "Silent"),
    ("never", "未接続", "Never heard"),
    ("last_heard", "最終受信", "Last heard"),
    ("devices", "機器", "Devices"),
    ("lost", "応答なし", "not answering"),
    ("oximeter", "パルスオキシメータ", "Pulse oximeter"),
    ("ventilator", "人工呼吸器アラーム", "Ventilator alarm"),
    ("normal", "正常", "normal"),
    ("alarm", "アラーム", "ALARM"),
    ("cable_fault", "配線異常", "cable fault"),
    ("acknowledge", "確認", "Acknowledge"),
    ("acknowledged", "確認済み", "Acknowledged"),
    ("clear", "解除", "Clear"),
    ("back", "戻る", "Back"),
    ("clear_confirm", "解除する（状態が終わったことを確かめた）", "Clear it (I checked the condition is over)"),
    (
        "clear_unconfirmed",
        "解除は、状態が終わったことを確かめたというチェックを入れてから押してください。",
        "To clear an alert, first tick that you checked the condition is over.",
    ),
    ("note", "メモ（対応内容）", "Note (what you are doing)"),
    ("no_alerts", "未解決の通知はありません。", "No open alerts."),
    ("no_homes", "表示できる世帯はありません。", "No homes to show."),
    ("triage", "優先順（出発の目安順）", "Triage (by the time to leave)"),
    ("leave_by", "出発の目安", "Leave by"),
    ("change_scope", "役割・範囲を変更", "Change role and scope"),
    ("readiness", "備えの状況", "Readiness"),
    ("handling", "担当", "Handled by"),
    ("answered", "答え", "Answered"),
    ("add_home", "世帯を追加する", "Add a home"),
    ("consent_given", "同意あり（{on}）", "consent given ({on})"),
    ("consent_missing", "保護者の同意がないため、この方には通知しません", "no consent from the guardian: this contact is sent nothing"),
    ("consent_unrecorded", "同意は未記録", "consent not recorded"),
    ("consent_withdrawn", "同意は撤回済み", "consent withdrawn"),
    ("consent_not_yet", "同意はまだ有効になっていません", "consent not yet in force"),
    ("withheld", "保護者の同意が記録されていないため表示していない世帯が{n}世帯あります。同意書を確かめ、管理者に支援計画への記録を頼んでください。", "{n} homes in your area are not shown: no consent from the guardian is recorded for your role. Check the consent forms and ask an administrator to record them in the care plans."),
    ("edit_plan", "支援計画（機器・予備電源・避難先・連絡先）を見る・変える", "View or change the care plan (devices, backup, destination, contacts)"),
    ("plan_saved", "支援計画を保存しました（第{n}版）。次の通知から使われます。", "The care plan was saved (version {n}); it is used from the next message on."),
    ("token_which", "どのトークンか指定してください。", "Say which token."),
    ("token_none", "そのトークンはありません。", "There is no such token."),
    ("token_already", "このトークンは失効済みです。", "That token is revoked already."),
    ("api_tokens", "APIトークン", "API tokens"),
    ("revoke", "失効させる", "Revoke"),
    ("revoked", "失効済み", "revoked"),
    ("scope_list", "市町村コードまたは世帯（カンマ区切り）", "Municipality codes or homes (comma-separated)"),
    ("destination", "避難先", "Destination"),
    ("travel", "移動", "Travel"),
    ("tier", "段階", "Tier"),
    ("since", "発生", "Since"),
    ("history", "通知の配信履歴", "Delivery history"),
    ("recipient", "宛先", "Recipient"),
    ("channel", "経路", "Channel"),
    ("status", "状態", "Status"),
    ("attempts", "試行", "Attempts"),
    ("last_error", "最後のエラー", "Last error"),
    ("delivered", "配信済み", "delivered"),
    ("pending", "再送待ち", "retrying"),
    ("abandoned", "送信を中止", "given up"),
    ("not_needed", "確認済みのため送信せず", "not sent: acknowledged"),
    ("fallback", "次の宛先へ通知済み", "next recipient told"),
    ("events", "経過", "Events"),
    ("charts", "過去24時間", "Last 24 hours"),
    ("charge", "バッテリー残量 %", "Battery charge %"),
    ("battery_v", "バッテリー電圧 V", "Battery voltage V"),
    ("time_left_min", "今回の停電での残り時間（分）", "Time left in this outage (min)"),
    ("band_p50", "見込み", "expected"),
    ("battery_measured", "バッテリーの実力（測定）", "Battery as measured"),
    ("band_p10", "短い場合", "if shorter"),
    ("band_p90", "長い場合", "if longer"),
    ("no_outage", "停電していません", "Not on battery"),
    ("spo2", "SpO2 %", "SpO2 %"),
    ("pulse", "脈拍 /分", "Pulse /min"),
    ("no_data", "データなし", "No data"),
    ("all_alerts", "通知の履歴", "Alert history"),
    ("cleared", "解除", "cleared"),
    ("cleared_by", "解除した人", "cleared by"),
    ("live", "自動更新", "Live"),
    (
        "safety",
        "mamoriは遠隔の補助通知です。機器本体のアラームを止めたり置き換えたりしません。",
        "mamori is a secondary, remote notification. It never silences or replaces a device's own alarm.",
    ),
    ("change_password", "パスワード変更", "Change password"),
    ("current_password", "現在のパスワード", "Current password"),
    ("new_password", "新しいパスワード（12文字以上）", "New password (12+ characters)"),
    ("save", "保存", "Save"),
    ("totp", "二要素認証", "Two-factor authentication"),
    ("totp_on", "設定済みです。", "It is on."),
    (
        "totp_setup",
        "認証アプリにこの鍵を登録し、表示されたコードを入力してください。",
        "Add this key to an authenticator app and type the code it shows.",
    ),
    ("done", "完了しました。", "Done."),
    ("role", "役割", "Role"),
    ("scope", "範囲", "Scope"),
    ("disabled", "無効", "disabled"),
    ("disable", "無効にする", "Disable"),
    ("enable", "有効にする", "Enable"),
    ("add_user", "ユーザー追加", "Add a user"),
    ("display_name", "表示名", "Display name"),
    ("municipalities", "市区町村コード（カンマ区切り）", "Municipality codes (comma separated)"),
    ("homes_scope", "世帯ID（カンマ区切り）", "Home ids (comma separated)"),
    ("new_token", "APIトークン発行", "New API token"),
    ("token_shown_once", "このトークンは一度だけ表示されます。", "This token is shown once."),
    ("reset_password", "パスワード再設定", "Reset password"),
    ("chain_ok", "改ざんの形跡はありません", "The chain is intact"),
    ("chain_broken", "改ざんの形跡があります", "The chain is BROKEN"),
    ("export", "CSVで書き出す", "Export CSV"),
    ("older", "さらに古い記録", "Older entries"),
];

impl T {
    /// A word.
    pub fn t(self, key: &'static str) -> &'static str {
        WORDS.iter().find(|(k, _, _)| *k == key).map_or(key, |(_, ja, en)| if self.0 == Lang::En { en } else { ja })
    }
}

/// A time of day to act by: `14:20` today, `12/01 14:20` on another day.
pub(super) fn clock(t: Time, now: Time, offset: FixedOffset) -> String {
    let (a, b) = (t.with_timezone(&offset), now.with_timezone(&offset));
    if a.date_naive() == b.date_naive() {
        a.format("%H:%M").to_string()
    } else {
        a.format("%m/%d %H:%M").to_string()
    }
}

pub(super) fn local(t: Time, offset: FixedOffset) -> String {
    t.with_timezone(&offset).format("%m/%d %H:%M").to_string()
}

pub(super) fn local_s(t: Time, offset: FixedOffset) -> String {
    t.with_timezone(&offset).format("%m/%d %H:%M:%S").to_string()
}

/// A page without the navigation (login).
pub fn layout_bare(lang: Lang, title: &str, body: &str) -> String {
    let l = if lang == Lang::En { "en" } else { "ja" };
    format!(
        "<!doctype html><html lang=\"{l}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{} · mamori</title>\
         <link rel=\"stylesheet\" href=\"/static/app.css\"></head><body class=\"narrow\"><main id=\"main\">{body}</main></body></html>",
        escape(title)
    )
}

pub(super) fn layout(v: &Viewer, title: &str, body: &str) -> Html<String> {
    let t = T(v.lang);
    let l = if v.lang == Lang::En { "en" } else { "ja" };
    let readiness = if matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator) {
        format!("<a href=\"/readiness\">{}</a>", t.t("readiness"))
    } else {
        String::new()
    };
    let admin = if v.user.role == AccountRole::Admin {
        format!(
            "<a href=\"/admin/users\">{}</a><a href=\"/admin/audit\">{}</a><a href=\"/admin/delivery\">{}</a>",
            t.t("users"),
            t.t("audit"),
            t.t("delivery")
        )
    } else {
        String::new()
    };
    let other = if v.lang == Lang::En { ("ja", "日本語") } else { ("en", "English") };
    Html(format!(
        "<!doctype html><html lang=\"{l}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{title} · mamori</title>\
         <link rel=\"stylesheet\" href=\"/static/app.css\"><script src=\"/static/app.js\" defer></script></head>\
         <body><header><nav><a class=\"brand\" href=\"/\">mamori</a><a href=\"/\">{ov}</a><a href=\"/alerts\">{al}</a>{readiness}{admin}\
         <span class=\"spacer\"></span><span class=\"live\" id=\"live\" hidden>● {live}</span>\
         <a href=\"/lang/{ol}?next=/\">{on}</a><a href=\"/account\">{name}</a>\
         <form method=\"post\" action=\"/logout\" class=\"inline\">{csrf}<button class=\"link\">{lo}</button></form></nav></header>\
         <main id=\"main\">{body}</main><footer>{safety}</footer></body></html>",
        title = escape(title),
        ov = t.t("overview"),
        al = t.t("alerts"),
        live = t.t("live"),
        ol = other.0,
        on = other.1,
        name = escape(&v.user.display_name),
        csrf = v.csrf_field(),
        lo = t.t("logout"),
        safety = t.t("safety"),
    ))
}

pub(super) fn not_found(lang: Lang) -> Response {
    let msg = if lang == Lang::En { "Not found." } else { "見つかりません。" };
    (StatusCode::NOT_FOUND, Html(layout_bare(lang, "404", &format!("<p>{msg}</p><p><a href=\"/\">mamori</a></p>"))))
        .into_response()
}

/// An account error for the person who made it: a password's reason in their language.
pub(super) fn account_error(e: &accounts::AccountError, lang: Lang) -> String {
    match e {
        accounts::AccountError::Password(p) => p.text(lang != Lang::En),
        e => e.to_string(),
    }
}

pub(super) fn failed(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "dashboard");
    (StatusCode::SERVICE_UNAVAILABLE, Html("<p>一時的に表示できません / Temporarily unavailable</p>".to_string()))
        .into_response()
}

pub(super) fn time_left_text(h: &HomeView, t: T) -> String {
    match h.time_left_s {
        Some(s) => {
            let last = if h.on_last_battery {
                format!(" <span class=\"bad\">({})</span>", t.t("last_battery"))
            } else {
                String::new()
            };
            let unverified = if h.forecast_verified == Some(false) {
                format!("<br><small class=\"muted\">{}</small>", crate::message::unverified(t.0))
            } else {
                String::new()
            };
            format!(
                "<strong>{}</strong>{last}<br><small>{}</small>{unverified}",
                crate::message::time_left_text(s, h.time_left_range_s, t.0),
                basis(h.basis.unwrap_or(""), t.0)
            )
        }
        None => "—".into(),
    }
}

/// When the child must leave, in words, and its row's urgency class: past it, within 30
/// minutes, within 3 hours, later. Without a destination (`leave`: false) there is no time to
/// leave by, only the time the power runs out.
fn leave_text(
    leave_in_s: Option<i64>,
    leave: bool,
    now: Time,
    offset: FixedOffset,
    lang: Lang,
) -> (String, &'static str) {
    let Some(s) = leave_in_s else { return (String::new(), "") };
    let at = clock(now + chrono::Duration::seconds(s), now, offset);
    let ja = lang == Lang::Ja;
    if s <= 0 {
        let text = match (leave, ja) {
            (true, true) => format!("出発の目安を過ぎています（{at}）"),
            (true, false) => format!("Past the time to leave ({at})"),
            (false, true) => format!("電源が尽きる目安を過ぎています（{at}）"),
            (false, false) => format!("Past the time the power runs out ({at})"),
        };
        return (text, "leave-overdue");
    }
    let left = crate::message::duration(s, lang);
    let text = match (leave, ja) {
        (true, true) => format!("出発の目安 {at}（あと{left}）"),
        (true, false) => format!("Leave by {at} (in {left})"),
        (false, true) => format!("避難先なし・電源が尽きる目安 {at}（あと{left}）"),
        (false, false) => format!("No destination; the power runs out by {at} (in {left})"),
    };
    let cls = if s < 30 * 60 {
        "leave-soon"
    } else if s < 3 * 3600 {
        "leave-hours"
    } else {
        ""
    };
    (text, cls)
}

pub(super) fn power_cell(h: &HomeView, t: T) -> String {
    let cls = match h.power {
        "battery" => "bad",
        "mains" => "ok",
        _ => "muted",
    };
    format!("<span class=\"pill {cls}\">{}</span>", t.t(h.power))
}

pub(super) fn conn_cell(h: &HomeView, t: T, offset: FixedOffset) -> String {
    let cls = match h.connectivity {
        "silent" => "bad",
        "online" => "ok",
        _ => "muted",
    };
    let heard = h.last_heard.map(|l| local_s(l, offset)).unwrap_or_else(|| "—".into());
    format!("<span class=\"pill {cls}\">{}</span><br><small>{heard}</small>", t.t(h.connectivity))
}

/// A device for people: its kind in words (its id, the installer's name for it, on hover).
fn device_text(h: &HomeView, id: &str, lang: Lang) -> String {
    use mamori_protocol::mqtt::DeviceKind as K;
    let words = match (h.device_kinds.get(id), lang) {
        (Some(K::Ups), _) => "UPS",
        (Some(K::Oximeter), Lang::Ja) => "パルスオキシメータ",
        (Some(K::Oximeter), Lang::En) => "pulse oximeter",
        (Some(K::Bridge), Lang::Ja) => "センサー基板",
        (Some(K::Bridge), Lang::En) => "sensor bridge",
        (Some(K::PowerMonitor), Lang::Ja) => "電源モニター",
        (Some(K::PowerMonitor), Lang::En) => "power monitor",
        (Some(K::Contacts), Lang::Ja) => "接点入力",
        (Some(K::Contacts), Lang::En) => "contacts",
        (None, _) => return format!("<code>{}</code>", escape(id)),
    };
    format!("<span title=\"{}\">{words}</span>", escape(id))
}

pub(super) fn devices_cell(h: &HomeView, t: T) -> String {
    let mut s = String::new();
    for d in &h.devices {
        if h.devices_lost.contains(d) {
            let _ = write!(s, "<span class=\"pill bad\">{} {}</span> ", device_text(h, d, t.0), t.t("lost"));
        } else {
            let _ = write!(s, "<span class=\"pill\">{}</span> ", device_text(h, d, t.0));
        }
    }
    if s.is_empty() {
        "—".into()
    } else {
        s
    }
}

/// Readings of a silent home are its last known ones, not the present: said so, with their age.
fn stale_note(h: &HomeView, now: Time, lang: Lang) -> String {
    let Some(heard) = h.last_heard.filter(|_| h.silent) else { return String::new() };
    let min = (now - heard).num_minutes().max(0);
    match lang {
        Lang::Ja => format!("<br><small class=\"stale\">最後に届いた値（{min}分前）</small>"),
        Lang::En => format!("<br><small class=\"stale\">last known ({min} min ago)</small>"),
    }
}

pub(super) fn oxi_cell(h: &HomeView, now: Time, lang: Lang) -> String {
    match (h.spo2_pct, h.pulse_bpm) {
        (None, None) => "—".into(),
        (s, p) => {
            let (s, p) =
                (s.map_or_else(|| "—".into(), |v| format!("{v}%")), p.map_or_else(|| "—".into(), |v| v.to_string()));
            let text = match lang {
                Lang::Ja => format!("SpO2 {s}・脈拍 {p}/分"),
                Lang::En => format!("SpO2 {s} · pulse {p}/min"),
            };
            format!("{text}{}", stale_note(h, now, lang))
        }
    }
}

/// A home's opaque id, shown to administrators (installers match it to the home unit); the
/// others know a home by its label.
pub(super) fn id_for_installer(v: &Viewer, id: &str) -> String {
    if v.user.role == AccountRole::Admin {
        format!(" <small><code>{}</code></small>", escape(id))
    } else {
        String::new()
    }
}

/// Minutes, in words.
pub(super) fn minutes(m: u32, lang: Lang) -> String {
    match lang {
        Lang::Ja => format!("移動{m}分"),
        Lang::En => format!("{m} min"),
    }
}

/// Who acknowledged, for people: an account's name, or how it came.
pub(super) fn by_text(by: &str, lang: Lang) -> String {
    let ja = lang == Lang::Ja;
    match by {
        "link" if ja => "リンクから".into(),
        "link" => "by link".into(),
        "voice" if ja => "電話で".into(),
        "voice" => "by phone".into(),
        other => match other.split_once(':') {
            Some(("cli", who)) if ja => format!("{}（管理コマンド）", escape(who)),
            Some(("cli", who)) => format!("{} (command line)", escape(who)),
            Some(("api", who)) if ja => format!("{}（連携システム）", escape(who)),
            Some(("api", who)) => format!("{} (API)", escape(who)),
            _ => escape(other),
        },
    }
}

/// An account's role, in words.
pub(super) fn account_role_text(role: AccountRole, lang: Lang) -> &'static str {
    match (role, lang) {
        (AccountRole::Admin, Lang::Ja) => "管理者",
        (AccountRole::Admin, Lang::En) => "administrator",
        (AccountRole::Coordinator, Lang::Ja) => "コーディネーター",
        (AccountRole::Coordinator, Lang::En) => "coordinator",
        (AccountRole::Facility, Lang::Ja) => "受け入れ先",
        (AccountRole::Facility, Lang::En) => "facility",
        (AccountRole::Family, Lang::Ja) => "ご家族",
        (AccountRole::Family, Lang::En) => "family",
    }
}

/// A channel in a delivery history: its kind in words, its address as a code to copy.
pub(super) fn channel_cell(ch: &crate::homes::ChannelRef, lang: Lang) -> String {
    use crate::homes::ChannelRef as C;
    let kind = channel_text(crate::stats::channel_of(&crate::dispatch::destination(ch)), lang);
    let target = match ch {
        C::Webhook(x) | C::Email(x) | C::Sms(x) | C::Line(x) | C::Voice(x) | C::Console(x) => x,
    };
    format!("{kind} <code>{}</code>", escape(target))
}

pub(super) fn vent_cell(h: &HomeView, now: Time, t: T) -> String {
    // A silent home's "normal" is not known to be normal now: no reassuring green.
    let ok = if h.silent { "pill stale" } else { "pill ok" };
    match h.ventilator {
        Some("normal") => format!("<span class=\"{ok}\">{}</span>{}", t.t("normal"), stale_note(h, now, t.0)),
        Some(k @ ("alarm" | "cable_fault")) => format!(
            "<span class=\"pill bad\">{}</span>{}",
            t.t(if k == "alarm" { "alarm" } else { "cable_fault" }),
            stale_note(h, now, t.0)
        ),
        _ => "—".into(),
    }
}

fn incidents_html(engine: &Engine, v: &Viewer, now: Time, offset: FixedOffset) -> String {
    let t = T(v.lang);
    let mut s = String::new();
    for i in view::incidents(engine, &v.user, now) {
        let battery = i.rows.iter().filter(|r| r.on_battery).count();
        let silent = i.rows.iter().filter(|r| r.silent).count();
        let _ = write!(
            s,
            "<section class=\"incident\"><h2><a href=\"/incidents/{id}\">{title} {m}</a></h2>\
             <p>{since} {opened} · {battery}/{n} {bat} · {silent} {sil}</p></section>",
            id = escape(&i.id),
            title = t.t("incident"),
            m = escape(i.municipality_name.as_deref().unwrap_or(&i.municipality)),
            since = t.t("since"),
            opened = local(i.opened_at, offset),
            n = i.rows.len(),
            bat = t.t("battery"),
            sil = t.t("silent"),
        );
    }
    s
}

/// The overview's query: `answered` (a home id) and `told` after a facility's answer.
#[derive(Deserialize, Default)]
pub struct OverviewQuery {
    answered: Option<String>,
    told: Option<String>,
}

/// `GET /`: every home the user may see, grouped by municipality, worst first (a family goes
/// to its home's page, a facility sees the children who may come to it).
pub async fn overview(State(app): State<App>, v: Viewer, client: Client, Query(q): Query<OverviewQuery>) -> Response {
    // A family has one home: its page is the family's start (see `family.rs`).
    if v.user.role == AccountRole::Family {
        if let [home] = v.user.homes.as_slice() {
            return Redirect::to(&format!("/homes/{}", super::escape(home))).into_response();
        }
    }
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::clock::now();
    let offset = app.style.offset;
    let mut body = incidents_html(&snap.engine, &v, now, offset);
    let homes = view::homes(&snap.engine, &v.user, now);
    app.audit_view(&v, &client.text(), "view_overview", "homes", &format!("{} homes", homes.len())).await;
    let withheld = view::withheld(&snap.engine, &v.user);
    let withheld = if withheld > 0 {
        format!("<p class=\"notice\">{}</p>", t.t("withheld").replace("{n}", &withheld.to_string()))
    } else {
        String::new()
    };
    if v.user.role == AccountRole::Facility {
        let told = q.told.as_deref().and_then(super::Told::from_query);
        let answered = q.answered.as_deref().zip(told);
        return super::facility::page(&snap.engine, &v, &homes, now, offset, answered, &withheld);
    }
    if homes.is_empty() {
        let _ = write!(body, "<p>{}</p>", t.t("no_homes"));
    }
    body.push_str(&withheld);
    if matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator) {
        let _ = write!(body, "<p class=\"noprint\"><a href=\"/plans/new\">{}</a></p>", t.t("add_home"));
    }
    let mut groups: BTreeMap<String, Vec<&HomeView>> = BTreeMap::new();
    let mut order = Vec::new();
    for h in &homes {
        let m = h.municipality_name.clone().unwrap_or_else(|| h.municipality.clone());
        if !groups.contains_key(&m) {
            order.push(m.clone());
        }
        groups.entry(m).or_default().push(h);
    }
    for m in order {
        let _ = write!(
            body,
            "<section><h2>{m}</h2><table class=\"homes\"><thead><tr><th>{home}</th><th>{power}</th><th>{left}</th>\
             <th>{conn}</th><th>{dev}</th><th>{oxi}</th><th>{vent}</th><th>{al}</th></tr></thead><tbody>",
            m = escape(&m),
            home = t.t("home"),
            power = t.t("power"),
            left = t.t("time_left"),
            conn = t.t("last_heard"),
            dev = t.t("devices"),
            oxi = t.t("oximeter"),
            vent = t.t("ventilator"),
            al = t.t("alerts"),
        );
        for h in &groups[&m] {
            let alerts: Vec<String> = h
                .alerts
                .iter()
                .map(|a| {
                    let ack = if a.acknowledged.is_some() { " ✓" } else { "" };
                    format!(
                        "<span class=\"pill sev-{:?}\">{}{ack}</span>",
                        a.severity,
                        escape(kind_text(&a.kind, v.lang))
                    )
                })
                .collect();
            let (leave, leave_cls) = if h.power == "battery" {
                leave_text(h.leave_by.map(|l| (l - now).num_seconds()), true, now, offset, v.lang)
            } else {
                (String::new(), "")
            };
            let row_cls =
                if h.power == "battery" || h.silent { format!(" class=\"urgent {leave_cls}\"") } else { String::new() };
            let _ = write!(
                body,
                "<tr{row_cls} data-home=\"{id}\"><td data-label=\"{hl}\"><a href=\"/homes/{id}\">{label}</a>{shown_id}{handled}</td>\
                 <td data-label=\"{pl}\">{power}</td><td data-label=\"{tl}\">{left}</td><td data-label=\"{cl}\">{conn}</td>\
                 <td data-label=\"{dl}\">{dev}</td><td data-label=\"{ol}\">{oxi}</td><td data-label=\"{vl}\">{vent}</td><td data-label=\"{al}\">{alerts}</td></tr>",
                id = escape(&h.id),
                shown_id = id_for_installer(&v, &h.id),
                handled = view::handler(h)
                    .map(|k| format!("<br><small class=\"handler\">{}: {}</small>", t.t("handling"), escape(&k.by)))
                    .unwrap_or_default(),
                label = escape(&h.label),
                power = power_cell(h, t),
                left = if leave.is_empty() {
                    time_left_text(h, t)
                } else {
                    format!("{}<br><small class=\"leave\">{leave}</small>", time_left_text(h, t))
                },
                conn = conn_cell(h, t, offset),
                dev = devices_cell(h, t),
                oxi = oxi_cell(h, now, v.lang),
                vent = vent_cell(h, now, t),
                alerts = alerts.join(" "),
                hl = t.t("home"),
                pl = t.t("power"),
                tl = t.t("time_left"),
                cl = t.t("last_heard"),
                dl = t.t("devices"),
                ol = t.t("oximeter"),
                vl = t.t("ventilator"),
                al = t.t("alerts"),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    layout(&v, t.t("overview"), &body).into_response()
}

fn ack_form(v: &Viewer, a: &AlertView, back: &str) -> String {
    let t = T(v.lang);
    let clear = if v.user.may_clear() {
        format!(
            "<form method=\"post\" action=\"/alerts/{id}/clear\" class=\"inline clear\">{csrf}<input type=\"hidden\" name=\"next\" value=\"{back}\">\
             <label><input type=\"checkbox\" name=\"confirm\" value=\"1\" required> {cc}</label> \
             <button class=\"secondary\">{c}</button></form>",
            id = escape(&a.id),
            csrf = v.csrf_field(),
            back = escape(back),
            cc = t.t("clear_confirm"),
            c = t.t("clear")
        )
    } else {
        String::new()
    };
    format!(
        "<form method=\"post\" action=\"/alerts/{id}/ack\" class=\"ack\">{csrf}<input type=\"hidden\" name=\"next\" value=\"{back}\">\
         <input name=\"note\" maxlength=\"200\" placeholder=\"{note}\" aria-label=\"{note}\"><button>{ack}</button></form>{clear}",
        id = escape(&a.id),
        csrf = v.csrf_field(),
        back = escape(back),
        note = t.t("note"),
        ack = t.t("acknowledge"),
    )
}

fn ack_text(a: &AlertView, t: T, offset: FixedOffset) -> String {
    let mut out = match &a.acknowledged {
        Some(k) => format!(
            "<span class=\"pill ok\">{} {} {}</span>{}",
            t.t("acknowledged"),
            escape(&k.by),
            local(k.at, offset),
            k.said(t.0).map(|n| format!(" <q>{}</q>", escape(&n))).unwrap_or_default()
        ),
        None => String::new(),
    };
    // What was said after the first acknowledgement (a family's 「避難します」): every later
    // acknowledgement that carries a note, with who and when.
    for k in a.acks.iter().filter(|k| Some(*k) != a.acknowledged.as_ref()) {
        let Some(said) = k.said(t.0) else { continue };
        let _ = write!(
            out,
            "<br><small>{} {}{}{}{} <q>{}</q></small>",
            local(k.at, offset),
            escape(&k.by),
            if t.0 == Lang::Ja { "（" } else { " (" },
            role_text(k.role, t.0),
            if t.0 == Lang::Ja { "）" } else { ")" },
            escape(&said)
        );
    }
    out
}

/// An alert's row: with `label` (the alerts page) its home first, with `leave` (the alerts
/// page) when its child must leave after the tier.
pub(super) fn alert_row(
    v: &Viewer,
    label: Option<&str>,
    leave: Option<&str>,
    a: &AlertView,
    back: &str,
    offset: FixedOffset,
) -> String {
    let t = T(v.lang);
    let home = label
        .map(|l| {
            format!(
                "<td data-label=\"{}\"><a href=\"/homes/{id}\">{}</a></td>",
                t.t("home"),
                escape(l),
                id = escape(&a.home)
            )
        })
        .unwrap_or_default();
    format!(
        "<tr data-alert=\"{id}\">{home}<td data-label=\"{kl}\"><span class=\"pill sev-{sev:?}\">{kind}</span></td>\
         <td data-label=\"{tl}\">{tier}</td>{leave}<td data-label=\"{sl}\">{since}</td><td>{ack}{form}</td></tr>",
        id = escape(&a.id),
        leave = leave.map(|l| format!("<td data-label=\"{}\">{l}</td>", t.t("leave_by"))).unwrap_or_default(),
        kl = t.t("alerts"),
        sev = a.severity,
        kind = escape(kind_text(&a.kind, v.lang)),
        tl = t.t("tier"),
        tier = tier_text(a.tier, v.lang),
        sl = t.t("since"),
        since = local(a.since, offset),
        ack = ack_text(a, t, offset),
        form = ack_form(v, a, back),
    )
}

/// `GET /alerts`: open alerts across the user's homes.
pub async fn alerts(State(app): State<App>, v: Viewer, client: Client) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::clock::now();
    let list = view::open_alerts(&snap.engine, &v.user, now);
    app.audit_view(&v, &client.text(), "list_alerts", "alerts", &format!("{} alerts", list.len())).await;
    let mut body = format!("<h1>{}</h1>", t.t("alerts"));
    if list.is_empty() {
        let _ = write!(body, "<p>{}</p>", t.t("no_alerts"));
    } else {
        let _ = write!(
            body,
            "<table class=\"alerts\"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
            t.t("home"),
            t.t("alerts"),
            t.t("tier"),
            t.t("leave_by"),
            t.t("since"),
            t.t("acknowledged"),
        );
        for o in &list {
            let (leave, _) = leave_text(o.leave_in_s, o.has_destination, now, app.style.offset, v.lang);
            body.push_str(&alert_row(&v, Some(&o.label), Some(&leave), &o.alert, "/alerts", app.style.offset));
        }
        body.push_str("</tbody></table>");
    }
    layout(&v, t.t("alerts"), &body).into_response()
}

/// An acknowledgement or clear form.
#[derive(Deserialize)]
pub struct AckForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    note: String,
    next: Option<String>,
    /// Clearing: ticked that the condition was checked to be over.
    #[serde(default)]
    confirm: Option<String>,
}

/// `POST /alerts/{id}/ack`.
pub async fn ack_alert(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<AckForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let snap = app.snap();
    let Some(alert) = view::alert(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    let note = super::note(&f.note);
    let detail = format!("{} {}", alert.home.as_str(), note.clone().unwrap_or_default());
    let (role, by) = (v.user.role.ack_role(), v.user.username.clone());
    match app.ask(|reply| WebRequest::Ack { alert_id: id.clone(), role, by, note, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "ack", &id, detail.trim()).await;
            Redirect::to(&local_path(f.next.as_deref())).into_response()
        }
        Err(e) => {
            (StatusCode::CONFLICT, layout(&v, "409", &format!("<p class=\"error\">{}</p>", escape(&e)))).into_response()
        }
    }
}

/// `POST /alerts/{id}/clear`.
pub async fn clear_alert(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<AckForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let snap = app.snap();
    let Some(alert) = view::alert(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    if !v.user.may_clear() {
        return (StatusCode::FORBIDDEN, Html("<p>forbidden</p>".to_string())).into_response();
    }
    // Not one press away from the acknowledge button: the box must be ticked (the browser
    // asks for it; this holds without the browser's help).
    if f.confirm.as_deref() != Some("1") {
        let t = T(v.lang);
        let back = local_path(f.next.as_deref());
        let body = format!(
            "<p class=\"error\">{}</p><p><a href=\"{}\">{}</a></p>",
            t.t("clear_unconfirmed"),
            escape(&back),
            t.t("back")
        );
        return (StatusCode::BAD_REQUEST, layout(&v, t.t("clear"), &body)).into_response();
    }
    let home = alert.home.as_str().to_string();
    let by = v.user.username.clone();
    match app.ask(|reply| WebRequest::Clear { alert_id: id.clone(), by, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "clear", &id, &home).await;
            Redirect::to(&local_path(f.next.as_deref())).into_response()
        }
        Err(e) => {
            (StatusCode::CONFLICT, layout(&v, "409", &format!("<p class=\"error\">{}</p>", escape(&e)))).into_response()
        }
    }
}

/// `POST /incidents/{id}/ack`.
pub async fn ack_incident(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<AckForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let snap = app.snap();
    let now = crate::clock::now();
    if !view::incidents(&snap.engine, &v.user, now).iter().any(|i| i.id == id) {
        return not_found(v.lang);
    }
    let note = super::note(&f.note);
    let detail = note.clone().unwrap_or_default();
    let (role, by) = (v.user.role.ack_role(), v.user.username.clone());
    match app.ask(|reply| WebRequest::Ack { alert_id: id.clone(), role, by, note, reply }).await {
        Ok(()) => {
            app.audit(&v.user.username, &client.text(), "ack", &id, &detail).await;
            Redirect::to(&format!("/incidents/{id}")).into_response()
        }
        Err(e) => {
            (StatusCode::CONFLICT, layout(&v, "409", &format!("<p class=\"error\">{}</p>", escape(&e)))).into_response()
        }
    }
}

/// One row of a triage list as its page and its CSV both show it.
struct TriageCells {
    power: &'static str,
    power_cls: &'static str,
    row_cls: &'static str,
    left: String,
    basis: &'static str,
    leave: String,
    leave_cls: &'static str,
    tier: &'static str,
    acknowledged: &'static str,
    handling: String,
    destination: String,
    travel: String,
}

/// The columns of a triage list, in order.
fn triage_headings(t: T) -> [&'static str; 9] {
    [
        t.t("home"),
        t.t("power"),
        t.t("time_left"),
        t.t("leave_by"),
        t.t("tier"),
        t.t("acknowledged"),
        t.t("handling"),
        t.t("destination"),
        t.t("travel"),
    ]
}

fn triage_cells(
    r: &crate::engine::TriageRow,
    engine: &crate::engine::Engine,
    now: Time,
    offset: FixedOffset,
    lang: Lang,
) -> TriageCells {
    let t = T(lang);
    let (power, power_cls, row_cls) = if r.silent {
        (t.t("silent"), "bad", "urgent silent")
    } else if r.on_battery {
        (t.t("battery"), "bad", "urgent")
    } else {
        (t.t("mains"), "ok", "")
    };
    let (leave, leave_cls) = if r.on_battery {
        leave_text(r.leave_in_s, r.destination.is_some(), now, offset, lang)
    } else {
        (String::new(), "")
    };
    // Who took the home on, from its open alerts.
    let handling = engine
        .plan(&r.home)
        .map(|plan| view::home_view(plan, engine.home_state(&r.home), now))
        .and_then(|h| view::handler(&h).map(|k| k.by.clone()))
        .unwrap_or_default();
    TriageCells {
        power,
        power_cls,
        row_cls,
        left: r.time_left_s.map(|s| crate::message::time_left_text(s, r.time_left_range_s, lang)).unwrap_or_default(),
        basis: r.basis.as_deref().map(|b| basis(b, lang)).unwrap_or(""),
        leave,
        leave_cls,
        tier: tier_text(r.tier, lang),
        acknowledged: r.acknowledged_by.map(|x| role_text(x, lang)).unwrap_or(""),
        handling,
        destination: r.destination.clone().unwrap_or_default(),
        travel: r.travel_min.map(|m| minutes(m, lang)).unwrap_or_default(),
    }
}

/// `GET /incidents/{id}`: the triage list.
pub async fn incident(State(app): State<App>, v: Viewer, client: Client, Path(id): Path<String>) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::clock::now();
    let offset = app.style.offset;
    let Some(i) = view::incidents(&snap.engine, &v.user, now).into_iter().find(|i| i.id == id) else {
        return super::review::page(&app, &v, &client, &id).await;
    };
    app.audit_view(&v, &client.text(), "view_incident", &id, &i.municipality).await;
    let headings = triage_headings(t);
    let mut body = format!(
        "<h1>{} {}</h1><p>{} {} · <a href=\"/incidents/{}/triage.csv\">CSV</a></p><table class=\"triage\"><thead><tr>{}</tr></thead><tbody>",
        t.t("incident"),
        escape(i.municipality_name.as_deref().unwrap_or(&i.municipality)),
        t.t("since"),
        local(i.opened_at, offset),
        escape(&i.id),
        headings.iter().map(|h| format!("<th>{h}</th>")).collect::<String>(),
    );
    let dash = |s: &str| if s.is_empty() { "—".to_string() } else { escape(s) };
    for r in &i.rows {
        let c = triage_cells(r, &snap.engine, now, offset, v.lang);
        let cells = [
            format!("<a href=\"/homes/{}\">{}</a>", escape(r.home.as_str()), escape(&r.label)),
            format!("<span class=\"pill {}\">{}</span>", c.power_cls, c.power),
            format!("<strong>{}</strong><br><small>{}</small>", if c.left.is_empty() { "?" } else { &c.left }, c.basis),
            c.leave.clone(),
            c.tier.to_string(),
            dash(c.acknowledged),
            dash(&c.handling),
            dash(&c.destination),
            dash(&c.travel),
        ];
        let _ = write!(body, "<tr class=\"{} {}\">", c.row_cls, c.leave_cls);
        for (h, cell) in headings.iter().zip(cells) {
            let _ = write!(body, "<td data-label=\"{h}\">{cell}</td>");
        }
        body.push_str("</tr>");
    }
    body.push_str("</tbody></table>");
    body.push_str(&incident_acks_html(&i.acks, v.lang, offset));
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/incidents/{id}/ack\" class=\"ack\">{csrf}\
         <input name=\"note\" maxlength=\"200\" placeholder=\"{note}\" aria-label=\"{note}\"><button>{ack}</button></form>",
        id = escape(&i.id),
        csrf = v.csrf_field(),
        note = t.t("note"),
        ack = t.t("acknowledge"),
    );
    layout(&v, t.t("incident"), &body).into_response()
}

/// `GET /incidents/{id}/triage.csv`: the triage list for the disaster meeting, in the
/// reader's language, in the page's order (whoever must leave soonest first), with the same
/// cells as the page. Open incidents in scope only; audited.
pub async fn incident_csv(State(app): State<App>, v: Viewer, client: Client, Path(id): Path<String>) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::clock::now();
    let offset = app.style.offset;
    let Some(i) = view::incidents(&snap.engine, &v.user, now).into_iter().find(|i| i.id == id) else {
        return not_found(v.lang);
    };
    app.audit(&v.user.username, &client.text(), "export_triage", &id, &i.municipality).await;
    let mut out = String::from("\u{feff}");
    out.push_str(&audit::csv_row(triage_headings(t)));
    for r in &i.rows {
        let c = triage_cells(r, &snap.engine, now, offset, v.lang);
        out.push_str(&audit::csv_row([
            r.label.as_str(),
            c.power,
            &c.left,
            &c.leave,
            c.tier,
            c.acknowledged,
            &c.handling,
            &c.destination,
            &c.travel,
        ]));
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"mamori-triage.csv\""),
        ],
        out,
    )
        .into_response()
}

/// An incident's acknowledgements: who, in which role, when, and what they said.
pub(super) fn incident_acks_html(acks: &[crate::engine::AckInfo], lang: Lang, offset: FixedOffset) -> String {
    let mut out = String::new();
    for a in acks {
        let _ = write!(
            out,
            "<p class=\"muted\">{} {}（{}） {}{}</p>",
            T(lang).t("acknowledged"),
            by_text(&a.by, lang),
            role_text(a.role, lang),
            local(a.at, offset),
            a.note.as_ref().map(|n| format!(" <q>{}</q>", escape(n))).unwrap_or_default()
        );
    }
    out
}

/// A channel's name for people.
pub(super) fn channel_text(channel: &str, lang: Lang) -> &'static str {
    match (channel, lang) {
        ("webhook", _) => "Webhook",
        ("sms", Lang::Ja) => "ショートメッセージ",
        ("sms", Lang::En) => "SMS",
        ("email", Lang::Ja) => "メール",
        ("email", Lang::En) => "E-mail",
        ("line", _) => "LINE",
        ("voice", Lang::Ja) => "電話",
        ("voice", Lang::En) => "Phone call",
        ("console", Lang::Ja) => "コンソール",
        ("console", Lang::En) => "Console",
        (_, Lang::Ja) => "その他",
        (_, Lang::En) => "Other",
    }
}

/// What the user's pages show, reduced to a fingerprint: a change event is sent only when
/// it changes, so one home's telemetry says nothing to a user who cannot see that home.
/// Whether anything `user` may see changed after snapshot version `since`: version numbers
/// only, so a stream costs the same however large the homes' state is.
fn changed_for(snap: &crate::web::Snapshot, user: &crate::accounts::User, since: u64) -> bool {
    let homes = snap
        .home_versions
        .iter()
        .filter(|(_, v)| **v > since)
        .any(|(h, _)| snap.engine.plan(h).is_some_and(|p| view::sees(&snap.engine, user, p)));
    homes || snap.incident_versions.iter().any(|(m, v)| *v > since && user.may_see_municipality(m))
}

/// `GET /events`: server-sent events, `change` when something the user may see changed. At
/// most [`crate::web::MAX_LIVE_STREAMS`] at once (the page refreshes itself every minute
/// without one).
pub async fn live(State(app): State<App>, v: Viewer) -> Response {
    use std::sync::atomic::Ordering;
    struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    if app.live_streams.fetch_add(1, Ordering::Relaxed) >= crate::web::MAX_LIVE_STREAMS {
        app.live_streams.fetch_sub(1, Ordering::Relaxed);
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "too many live streams\n").into_response();
    }
    let slot = Slot(app.live_streams.clone());
    let rx = app.snapshot.clone();
    let user = v.user;
    let first = rx.borrow().version;
    struct Live {
        rx: tokio::sync::watch::Receiver<std::sync::Arc<crate::web::Snapshot>>,
        user: accounts::User,
        last: u64,
        _slot: Slot,
        app: App,
        session: String,
        checked: tokio::time::Instant,
    }
    // The session is checked again every 15 s: the stream ends (within 15 s) at logout, at the
    // session's expiry, and when the account is disabled.
    #[allow(clippy::disallowed_methods)] // when the session was last rechecked (tokio's clock)
    let live =
        Live { rx, user, last: first, _slot: slot, app, session: v.session, checked: tokio::time::Instant::now() };
    let stream = futures_util::stream::unfold(live, |mut l| async move {
        loop {
            let tick = tokio::time::sleep_until(l.checked + Duration::from_secs(15));
            let changed = tokio::select! {
                r = l.rx.changed() => { r.ok()?; true }
                _ = tick => false,
            };
            if l.checked.elapsed() >= Duration::from_secs(15) {
                let (session, now, s) = (l.session.clone(), crate::clock::now(), l.app.sessions);
                let alive = l
                    .app
                    .db(move |db| Ok(Accounts::new(db).session_alive(&session, now, s.idle, s.max_age)?))
                    .await
                    .unwrap_or(false);
                #[allow(clippy::disallowed_methods)] // when the session was last rechecked (tokio's clock)
                let checked = tokio::time::Instant::now();
                l.checked = checked;
                if !alive {
                    return None;
                }
            }
            if !changed {
                continue;
            }
            let snap = l.rx.borrow_and_update().clone();
            if changed_for(&snap, &l.user, l.last) {
                l.last = snap.version;
                let ev = SseEvent::default().event("change").data(snap.version.to_string());
                return Some((Ok::<_, Infallible>(ev), l));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// `GET /static/app.css`.
pub async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")],
        include_str!("assets/app.css"),
    )
        .into_response()
}

/// `GET /static/app.js`.
pub async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::home::{chart, contacts_html};

    #[test]
    fn contacts_are_listed_with_their_numbers_to_tap_and_call() {
        let plan: crate::homes::Home = serde_json::from_value(serde_json::json!({
            "id": "h1", "municipality": "431001", "label": "K-01", "devices": [], "backup": [],
            "contacts": [
                { "role": "family", "name": "母", "channels": [{ "sms": "090-1234-5678" }],
                  "then": [{ "after_min": 5, "channels": [{ "voice": "+819012345678" }] }] },
                { "role": "coordinator", "name": "佐藤", "channels": [{ "email": "sato@example.lg.jp" }] }
            ]
        }))
        .unwrap();
        let engine = Engine::new(crate::engine::Settings::default(), crate::policy::Policies::default());
        let html = contacts_html(&plan, T(Lang::Ja), &engine);
        assert!(html.contains("母（ご家族）"), "{html}");
        assert!(html.contains("<a href=\"tel:09012345678\">090-1234-5678</a>"), "{html}");
        assert!(html.contains("<a href=\"tel:+819012345678\">"), "the later channel's number too: {html}");
        assert!(html.contains("佐藤") && html.contains("電話番号の登録なし"), "{html}");
        let en = contacts_html(&plan, T(Lang::En), &engine);
        assert!(
            en.contains("(coordinator)") || en.contains("(the coordinator)") || en.contains("(Coordinator)"),
            "{en}"
        );
    }

    #[test]
    fn every_word_has_both_languages_and_keys_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (k, ja, en) in WORDS {
            assert!(seen.insert(k), "{k} twice");
            assert!(!ja.is_empty() && !en.is_empty(), "{k}");
        }
    }

    #[test]
    fn a_chart_scales_into_its_box_and_says_when_there_is_no_data() {
        let from = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let to = from + chrono::Duration::hours(24);
        let s = vec![(from, 50.0), (from + chrono::Duration::hours(12), 100.0), (to, 0.0)];
        let jst = FixedOffset::east_opt(9 * 3600).unwrap();
        let svg = chart("c", &[("c", s)], from, to, jst, "none");
        assert!(svg.contains(">23:13</text>") && svg.contains(">05:13</text>"), "{svg}");
        assert!(svg.contains("points=\"36.0,61.0 316.0,4.0 596.0,118.0\""), "{svg}");
        let late = vec![(to - chrono::Duration::minutes(10), 1.0), (to, 2.0)];
        let svg = chart("c", &[("c", late)], from, to, jst, "none");
        assert!(svg.contains("points=\"36.0,118.0 596.0,4.0\""), "a short history fills the width: {svg}");
        assert!(chart("c", &[("c", vec![])], from, to, jst, "none").contains("none"));
    }
}
