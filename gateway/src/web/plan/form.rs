//! The care-plan editor's HTML: the form (every problem listed on top and each also under its
//! input, tied to it with `aria-describedby`) and the table of versions. The values come from
//! [`Fields`] and are escaped by the templates.

use std::collections::BTreeMap;

use mamori_protocol::mqtt::Role;
use maud::{html, Markup};

use super::super::auth::Viewer;
use super::super::html::local;
use super::fields::Fields;
use super::{tr, BLANK_ROWS, MAX_ROWS};
use crate::domain::homes::{Field, Home, Lang, Problem};
use crate::edge::store::HomeVersion;

/// The form's values and, by input name, what is wrong there (shown under the input).
struct Ctx<'a> {
    fields: &'a Fields,
    errs: BTreeMap<String, Vec<String>>,
}

impl Ctx<'_> {
    fn get(&self, name: &str) -> &str {
        self.fields.get(name)
    }

    fn rows(&self, prefix: char) -> usize {
        self.fields.rows(prefix)
    }

    /// The error lines under an input (and so whether the input is marked invalid).
    fn err(&self, name: &str) -> Option<&[String]> {
        self.errs.get(name).map(Vec::as_slice)
    }
}

/// The lines under an input that say what is wrong there.
fn err_lines(name: &str, msgs: Option<&[String]>) -> Markup {
    html! {
        @if let Some(msgs) = msgs {
            small.error id={ (name) "-err" } {
                @for (k, m) in msgs.iter().enumerate() {
                    @if k > 0 { br; }
                    (m)
                }
            }
        }
    }
}

/// The input a problem is shown under.
fn input_of(field: &Field) -> String {
    match field {
        Field::Id => "id".into(),
        Field::Municipality => "municipality".into(),
        Field::MunicipalityName => "municipality_name".into(),
        Field::Label => "label".into(),
        Field::Devices => "d0_name".into(),
        Field::DeviceWatts(j) => format!("d{j}_watts"),
        Field::DeviceName(j) => format!("d{j}_name"),
        Field::Backup(j) | Field::BackupRuntime(j) => format!("b{j}_kind"),
        Field::Evacuation => "evac_destination".into(),
        Field::Contacts => "c0_name".into(),
        Field::ContactName(j) => format!("c{j}_name"),
        Field::ContactChannels(j) | Field::ContactChannel(j, _) => format!("c{j}_channels"),
        Field::StepAfter(j, _) | Field::StepChannels(j, _) | Field::StepChannel(j, _, _) => format!("c{j}_then"),
        Field::QuietHours(j) => format!("c{j}_quiet"),
        Field::Consent(j) => format!("c{j}_consent_by"),
        Field::Phone(j) => format!("c{j}_phone"),
        Field::ContactRole(j) => format!("c{j}_role"),
        Field::Escalation(_) => "label".into(),
    }
}

/// An input's own attributes, beyond its name and value.
#[derive(Default, Clone, Copy)]
struct Attrs {
    kind: Option<&'static str>,
    required: bool,
    inputmode: Option<&'static str>,
    maxlength: Option<u32>,
    pattern: Option<&'static str>,
    placeholder: Option<&'static str>,
}

const TEXT: Attrs =
    Attrs { kind: None, required: false, inputmode: None, maxlength: None, pattern: None, placeholder: None };

fn max(n: u32) -> Attrs {
    Attrs { maxlength: Some(n), ..TEXT }
}

fn mode(m: &'static str) -> Attrs {
    Attrs { inputmode: Some(m), ..TEXT }
}

fn input(f: &Ctx, name: &str, label: &str, a: Attrs) -> Markup {
    let err = f.err(name);
    html! {
        label {
            (label)
            input name=(name) value=(f.get(name)) type=[a.kind] required[a.required] inputmode=[a.inputmode]
                maxlength=[a.maxlength] pattern=[a.pattern] placeholder=[a.placeholder]
                aria-invalid=[err.map(|_| "true")] aria-describedby=[err.map(|_| format!("{name}-err"))];
            (err_lines(name, err))
        }
    }
}

fn select(f: &Ctx, name: &str, label: &str, options: &[(&str, &str)]) -> Markup {
    let err = f.err(name);
    html! {
        label {
            (label)
            select name=(name) aria-invalid=[err.map(|_| "true")] aria-describedby=[err.map(|_| format!("{name}-err"))] {
                @for (value, text) in options {
                    option value=(value) selected[f.get(name) == *value] { (text) }
                }
            }
            (err_lines(name, err))
        }
    }
}

fn textarea(f: &Ctx, name: &str, label: &str, hint: &str) -> Markup {
    let err = f.err(name);
    html! {
        label {
            (label)
            textarea name=(name) rows="2" aria-invalid=[err.map(|_| "true")]
                aria-describedby=[err.map(|_| format!("{name}-err"))] { (f.get(name)) }
            small { (hint) }
            (err_lines(name, err))
        }
    }
}

/// The editor: every problem listed on top, and each also under its input.
pub(super) fn form(v: &Viewer, f: &Fields, action: &str, based_on: u32, new: bool, problems: &[Problem]) -> Markup {
    let lang = v.lang;
    let t = |ja: &'static str, en: &'static str| tr(lang, ja, en);
    let mut errs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in problems {
        errs.entry(input_of(&p.field)).or_default().push(format!("{}: {}", p.field.label(lang), p.want.text(lang)));
    }
    let f = &Ctx { fields: f, errs };
    let kinds = [
        ("", t("なし", "none")),
        ("ups", t("無停電電源装置（UPS）", "UPS")),
        ("power_station", t("ポータブル電源", "Power station")),
        ("ventilator_internal", t("人工呼吸器の内蔵バッテリー", "Ventilator's internal battery")),
    ];
    let chems = [
        ("", t("種類に応じて", "usual for its kind")),
        ("lead_acid", t("鉛蓄電池", "lead-acid")),
        ("lithium", t("リチウム", "lithium")),
    ];
    let roles: Vec<(&str, &str)> =
        Role::ALL.into_iter().map(|r| (r.as_str(), crate::domain::message::role_text(r, lang))).collect();
    let langs = [("ja", "日本語"), ("en", "English")];
    html! {
        @if !problems.is_empty() {
            div.error role="alert" {
                p { (t("保存していません。次の点を直してください。", "Not saved. Please correct the following.")) }
                ul { @for p in problems { li { (p.field.label(lang)) ": " (p.want.text(lang)) } } }
            }
        }
        form method="post" action=(action) class="plan" data-no-live {
            (v.csrf_field())
            input type="hidden" name="based_on" value=(based_on);
            fieldset {
                legend { (t("世帯", "Home")) }
                @if new {
                    (input(
                        f,
                        "id",
                        t(
                            "世帯の番号（英小文字・数字・「-」、見守り機が使います）",
                            "Home id (lowercase letters, digits, -; the home unit uses it)",
                        ),
                        Attrs { required: true, maxlength: Some(64), pattern: Some("[a-z0-9-]{1,64}"), ..TEXT },
                    ))
                }
                (input(
                    f,
                    "label",
                    t("呼び名（通知と画面に出ます）", "Label (in messages and on the dashboard)"),
                    Attrs { required: true, maxlength: Some(80), ..TEXT },
                ))
                (input(
                    f,
                    "municipality",
                    t("市区町村コード（6桁）", "Municipality code (6 digits)"),
                    Attrs { required: true, inputmode: Some("numeric"), maxlength: Some(6), ..TEXT },
                ))
                (input(f, "municipality_name", t("市区町村名", "Municipality name"), max(40)))
            }
            fieldset {
                legend { (t("予備電源につなぐ機器", "Devices on backup power")) }
                p {
                    small {
                        (t(
                            "消費電力は銘板ではなく、ふだんの平均（W）です。空欄にした行は削除されます。",
                            "Watts are the average draw, not the nameplate. A row left blank is removed."
                        ))
                    }
                }
                @for j in 0..(f.rows('d') + BLANK_ROWS).min(MAX_ROWS) {
                    div.row {
                        (input(f, &format!("d{j}_name"), &format!("{} {}", t("機器", "Device"), j + 1), max(40)))
                        (input(f, &format!("d{j}_watts"), t("消費電力（W）", "Watts"), mode("decimal")))
                    }
                }
            }
            fieldset {
                legend { (t("予備電源", "Backup sources")) }
                p {
                    small {
                        (t(
                            "無停電電源装置とポータブル電源は、使える電力量か定格容量（Wh）を。人工呼吸器の内蔵バッテリーは動く時間（分）を入れてください。種類を「なし」にした行は削除されます。",
                            "A UPS or a power station needs its usable or nameplate energy (Wh); the ventilator's internal battery its runtime (min). A row whose kind is none is removed."
                        ))
                    }
                }
                @for j in 0..(f.rows('b') + BLANK_ROWS).min(MAX_ROWS) {
                    div.row {
                        (select(f, &format!("b{j}_kind"), &format!("{} {}", t("予備電源", "Source"), j + 1), &kinds))
                        (input(f, &format!("b{j}_usable_wh"), t("使える電力量（Wh）", "Usable Wh"), mode("decimal")))
                        (input(f, &format!("b{j}_nameplate_wh"), t("定格容量（Wh）", "Nameplate Wh"), mode("decimal")))
                        (input(f, &format!("b{j}_runtime_min"), t("動く時間（分）", "Runtime (min)"), mode("decimal")))
                        (select(f, &format!("b{j}_chemistry"), t("電池", "Battery"), &chems))
                    }
                }
            }
            fieldset {
                legend { (t("避難先", "Evacuation")) }
                div.row {
                    (input(f, "evac_destination", t("電源のある避難先", "Powered destination"), max(80)))
                    (input(f, "evac_travel_min", t("移動時間（分）", "Travel time (min)"), mode("numeric")))
                }
            }
            fieldset {
                legend { (t("連絡先", "Contacts")) }
                p {
                    small {
                        (t(
                            "ご家族以外の方には、保護者の同意（同意書の内容）を入れてください。ゲートウェイが同意を求める設定のときは、同意のない方には何も送りません。連絡手段は1行に一つ、「種類:宛先」の形で書きます（SMS:+819012345678、電話:+819012345678、LINE:LINEのID、メール:メールアドレス、連携:設定にある連携先の名前）。後で使う連絡手段は、確認がないときに使うもので、1行に「分: 種類:宛先」と書きます（例「5: 電話:+819012345678」）。名前と連絡手段を空欄にした行は削除されます。",
                            "For everyone but the family, record the guardian's consent as on the consent form: when the gateway requires consent, a contact without it is sent nothing. One channel per line as kind:address (sms:+819012345678, voice:+819012345678, line:U…, email:…, webhook:an endpoint named in the config). Later channels are used when the role has not acknowledged, one line each as minutes: kind:address (e.g. 5: voice:+819012345678). A row with no name and no channels is removed."
                        ))
                    }
                }
                @for j in 0..(f.rows('c') + BLANK_ROWS).min(MAX_ROWS) {
                    div.contact {
                        div.row {
                            (input(f, &format!("c{j}_name"), &format!("{} {}", t("連絡先", "Contact"), j + 1), max(40)))
                            (select(f, &format!("c{j}_role"), t("役割", "Role"), &roles))
                            (select(f, &format!("c{j}_language"), t("通知の言語", "Language"), &langs))
                            (input(
                                f,
                                &format!("c{j}_phone"),
                                t("電話番号（画面から電話をかけるとき）", "Phone (to call from the dashboard)"),
                                Attrs { kind: Some("tel"), placeholder: Some("+819012345678"), ..TEXT },
                            ))
                            (input(
                                f,
                                &format!("c{j}_quiet"),
                                t("通知を控える時間（例 22:00-07:00）", "Quiet hours (e.g. 22:00-07:00)"),
                                TEXT,
                            ))
                        }
                        div.row {
                            (textarea(f, &format!("c{j}_channels"), t("連絡手段", "Channels"), t("すぐに使います", "used at once")))
                            (textarea(
                                f,
                                &format!("c{j}_then"),
                                t("後で使う連絡手段", "Later channels"),
                                t("確認がないとき", "while unacknowledged"),
                            ))
                        }
                        div.row {
                            (input(
                                f,
                                &format!("c{j}_consent_by"),
                                t("同意した方（保護者）", "Consent given by (the guardian)"),
                                max(40),
                            ))
                            (input(
                                f,
                                &format!("c{j}_consent_on"),
                                t("同意した日", "Consent given on"),
                                Attrs { kind: Some("date"), ..TEXT },
                            ))
                            (input(f, &format!("c{j}_consent_purpose"), t("同意の目的", "For what"), max(200)))
                            (input(
                                f,
                                &format!("c{j}_consent_withdrawn"),
                                t("撤回した日", "Withdrawn on"),
                                Attrs { kind: Some("date"), ..TEXT },
                            ))
                        }
                    }
                }
            }
            p {
                small {
                    (t(
                        "通知の段階の個別設定は、この画面では変わりません。保存した内容は、次の通知から使われます。",
                        "Per-home escalation overrides are kept as they are. A saved plan is used from the next message on."
                    ))
                }
            }
            button type="submit" { (t("保存する", "Save")) }
        }
    }
}

/// What changed between two versions, in words.
fn changes(new: &Home, old: Option<&Home>, lang: Lang) -> String {
    let Some(old) = old else { return tr(lang, "最初の版", "First version").to_string() };
    let t = |ja: &'static str, en: &'static str| tr(lang, ja, en);
    let mut out = Vec::new();
    if new.label != old.label {
        out.push(t("呼び名", "label"));
    }
    if new.municipality != old.municipality || new.municipality_name != old.municipality_name {
        out.push(t("市区町村", "municipality"));
    }
    if new.devices != old.devices {
        out.push(t("機器", "devices"));
    }
    if new.backup != old.backup {
        out.push(t("予備電源", "backup"));
    }
    if new.evacuation != old.evacuation {
        out.push(t("避難先", "evacuation"));
    }
    if new.contacts != old.contacts {
        out.push(t("連絡先", "contacts"));
    }
    if new.escalation != old.escalation {
        out.push(t("通知の段階", "escalation"));
    }
    if out.is_empty() {
        return t("変更なし", "no change").to_string();
    }
    out.join(if lang == Lang::Ja { "・" } else { ", " })
}

fn version_by(by: &str, lang: Lang) -> String {
    match by {
        "" => tr(lang, "記録を始める前から", "before versions were kept").to_string(),
        "homes file" => tr(lang, "世帯ファイル", "the homes file").to_string(),
        "homes import" => tr(lang, "世帯ファイルの取り込み", "homes import").to_string(),
        other => other.to_string(),
    }
}

/// Every version, newest first, with who stored it and what changed.
pub(super) fn history(versions: &[HomeVersion], id: &str, offset: &chrono::FixedOffset, lang: Lang) -> Markup {
    let t = |ja: &'static str, en: &'static str| tr(lang, ja, en);
    html! {
        h2 { (t("変更の履歴", "Version history")) }
        table {
            thead {
                tr {
                    th { (t("版", "Version")) } th { (t("日時", "When")) } th { (t("変更した人", "By")) }
                    th { (t("変わったところ", "What changed")) } th {}
                }
            }
            tbody {
                @for (i, x) in versions.iter().enumerate() {
                    tr {
                        td { (x.version) }
                        td { (local(x.at, *offset)) }
                        td { (version_by(&x.by, lang)) }
                        td { (changes(&x.plan, versions.get(i + 1).map(|p| &p.plan), lang)) }
                        td {
                            @if i == 0 {
                                (t("現在の版", "current"))
                            } @else {
                                a href={ "/homes/" (id) "/plan?version=" (x.version) } { (t("この版を表示", "show")) }
                            }
                        }
                    }
                }
            }
        }
    }
}
