//! The HTML layer's ground floor: the words of the dashboard in Japanese and English ([`T`]),
//! times as a reader reads them, the page without navigation ([`layout_bare`], for the login),
//! the 404 and the error page. It depends on nothing else in `web`, so the login (`auth.rs`)
//! and every page can use it without importing each other.
//!
//! Every page is written with [maud](https://maud.lambda.xyz/)'s `html!`: text interpolated as
//! `(expr)` is escaped, so a label, a name or a note from the store can never become markup. A
//! fragment is a [`Markup`] and is passed on as one, never as a string. No page uses
//! `PreEscaped`; one that must would take only markup this code wrote itself, with a comment
//! saying so. The words of [`T`] are plain text (no tags): they are interpolated like any other.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use chrono::FixedOffset;

use crate::admin::accounts;
use crate::domain::engine::Time;
use crate::domain::homes::Lang;
use crate::domain::message::role_text;

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

/// The `<head>` of every page (`script`: the live updater, on signed-in pages).
pub(super) fn head(title: &str, script: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width,initial-scale=1";
            title { (title) " · mamori" }
            link rel="stylesheet" href="/static/app.css";
            @if script {
                script src="/static/app.js" defer {}
            }
        }
    }
}

/// A page without the navigation (login).
pub fn layout_bare(lang: Lang, title: &str, body: Markup) -> Markup {
    let l = if lang == Lang::En { "en" } else { "ja" };
    html! {
        (DOCTYPE)
        html lang=(l) {
            (head(title, false))
            body.narrow { main #main { (body) } }
        }
    }
}

pub(super) fn not_found(lang: Lang) -> Response {
    let msg = if lang == Lang::En { "Not found." } else { "見つかりません。" };
    let body = html! { p { (msg) } p { a href="/" { "mamori" } } };
    (StatusCode::NOT_FOUND, layout_bare(lang, "404", body)).into_response()
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
    (StatusCode::SERVICE_UNAVAILABLE, html! { p { "一時的に表示できません / Temporarily unavailable" } })
        .into_response()
}

/// Who acknowledged, for people: an account's name, or how it came (text, not HTML).
pub(super) fn by_text(by: &str, lang: Lang) -> String {
    let ja = lang == Lang::Ja;
    match by {
        "link" if ja => "リンクから".into(),
        "link" => "by link".into(),
        "voice" if ja => "電話で".into(),
        "voice" => "by phone".into(),
        other => match other.split_once(':') {
            Some(("cli", who)) if ja => format!("{who}（管理コマンド）"),
            Some(("cli", who)) => format!("{who} (command line)"),
            Some(("api", who)) if ja => format!("{who}（連携システム）"),
            Some(("api", who)) => format!("{who} (API)"),
            _ => other.to_string(),
        },
    }
}

/// An incident's acknowledgements: who, in which role, when, and what they said.
pub(super) fn incident_acks_html(acks: &[crate::domain::engine::AckInfo], lang: Lang, offset: FixedOffset) -> Markup {
    html! {
        @for a in acks {
            p.muted {
                (T(lang).t("acknowledged")) " " (by_text(&a.by, lang)) "（" (role_text(a.role, lang)) "） " (local(a.at, offset))
                @if let Some(n) = &a.note { " " q { (n) } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_has_both_languages_and_keys_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (k, ja, en) in WORDS {
            assert!(seen.insert(k), "{k} twice");
            assert!(!ja.is_empty() && !en.is_empty(), "{k}");
        }
    }
}
